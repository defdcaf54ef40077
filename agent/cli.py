"""The command line (SPEC §2). The only place that chooses exit codes:
0 clean stop, 2 bad config or usage, 1 anything unexpected."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, ConfigError, load_config

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2

log = logging.getLogger("agent.cli")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 too; keep the message on stderr
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpu-node-agent", description="GPU node lifecycle, readiness and metrics agent")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path)
    check = sub.add_parser("check-config", help="validate config and print the effective config as JSON")
    check.add_argument("--config", type=Path)
    for name, text in (("status", "ask the local agent what it is doing"),
                       ("drain", "admin drain"), ("resume", "end an admin drain")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--url", help="agent URL (default http://127.0.0.1:<service.port>)")
        cmd.add_argument("--config", type=Path)
        if name == "status":
            cmd.add_argument("--json", action="store_true", help="print the raw /status JSON")
        if name == "drain":
            cmd.add_argument("--reason", default="admin drain (cli)")
            cmd.add_argument("--wait", action="store_true", help="block until in-flight work is done")
            cmd.add_argument("--timeout", type=float, default=300.0, help="seconds to wait with --wait")
    demo = sub.add_parser("demo", help="the whole lifecycle on embedded simulators")
    demo.add_argument("--duration", type=float, default=45.0, help="seconds (default 45)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(_config(args.config))
        if args.command == "check-config":
            print(json.dumps(_config(args.config).redacted(), indent=2))
            return EXIT_OK
        if args.command == "demo":
            from agent.demo import run_demo

            return run_demo(args.duration)
        return _client(args)
    except ConfigError as exc:
        print(f"gpu-node-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def _config(path: Path | None) -> AgentConfig:
    return load_config(path)


def _run(cfg: AgentConfig) -> int:
    from agent.daemon import StartupError
    from agent.limits import raise_fd_limit
    from agent.logs import configure_logging, ensure_standard_fds, stop_logging

    from agent.signals import EarlySignals

    early = EarlySignals()
    early.install()  # from here on no signal kills the process; stop signals wait for the loop
    ensure_standard_fds()
    configure_logging(cfg.logging.level, cfg.logging.format.value)
    raise_fd_limit()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # uvloop is a dependency; keep running on the default loop if it is broken
        log.warning("uvloop unavailable; using the default event loop")
        runner = asyncio.Runner()
    try:
        with runner:
            runner.run(_serve(cfg, early.pending))
    except StartupError as exc:
        log.error("cannot start", extra={"error": str(exc)})
        return EXIT_ERROR
    except Exception:
        log.exception("agent crashed")
        return EXIT_ERROR
    finally:
        early.ignore()  # the process is on its way out: a late signal changes nothing
        stop_logging()
    return EXIT_OK


async def _serve(cfg: AgentConfig, pending_signals: list[str]) -> None:
    from agent.daemon import Daemon

    daemon = Daemon(cfg)
    daemon.install_signal_handlers(asyncio.get_running_loop(), pending_signals)
    await daemon.serve()


# --- client commands -----------------------------------------------------------------
def _client(args: argparse.Namespace) -> int:
    url = args.url or f"http://127.0.0.1:{_config(args.config).service.port}"
    url = url.rstrip("/")
    if args.command == "status":
        code, body = _http("GET", f"{url}/status", timeout_s=5)
        if code != 200:
            return _fail(code, body)
        print(json.dumps(body, indent=2) if args.json else render_status(body))
        return EXIT_OK
    if args.command == "drain":
        payload = {"reason": args.reason, "wait": args.wait, "timeout": args.timeout}
        code, body = _http("POST", f"{url}/drain", payload, timeout_s=args.timeout + 10 if args.wait else 10)
        print(json.dumps(body, indent=2))
        return EXIT_OK if code in (200, 202) else _fail(code, body, quiet=True)
    code, body = _http("POST", f"{url}/resume", {}, timeout_s=10)
    print(json.dumps(body, indent=2))
    return EXIT_OK if code == 200 else _fail(code, body, quiet=True)


def _http(method: str, url: str, payload: dict[str, Any] | None = None, *, timeout_s: float) -> tuple[int, Any]:
    data = None if payload is None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"error": raw.decode(errors="replace")[:500]}
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        reason = getattr(exc, "reason", exc)
        return 0, {"error": f"cannot reach the agent at {url}: {reason}"}


def _fail(code: int, body: Any, quiet: bool = False) -> int:
    if not quiet:
        print(f"gpu-node-agent: {body.get('error') if isinstance(body, dict) else body} (HTTP {code or 'n/a'})", file=sys.stderr)
    return EXIT_ERROR


def render_status(status: dict[str, Any]) -> str:
    from agent.status_view import render

    return render(status)
