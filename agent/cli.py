"""The command line (SPEC §2). The only place that chooses exit codes: 0 ok, 2 bad
config or usage (the message names the flag or field and the value), 1 anything else.

`status`, `drain` and `resume` only talk HTTP to a running agent: they import the
standard library and nothing else (no config model, no aiohttp), so they start fast and
keep working when the config file is broken. No traceback reaches a user: every
failure is one line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from agent import __version__

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
MAX_REASON_CHARS = 200  # what POST /drain accepts (service/app.py)
MAX_TIMEOUT_S = 86_400
DEFAULT_DRAIN_TIMEOUT_S = 300.0
STATUS_TIMEOUT_S = 5.0


class UsageError(Exception):
    """Bad usage; the message names the flag and the value. Exit 2."""


class CommandFailed(Exception):
    """The command could not do its job; the message says why and what to do. Exit 1."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse's own errors: exit 2, message on stderr
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gpu-node-agent", description="GPU node lifecycle, readiness and metrics agent")
    parser.add_argument("--version", action="version", version=f"gpu-node-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", type=Path)
    check = sub.add_parser("check-config", help="validate config and print the effective config as JSON")
    check.add_argument("--config", type=Path)
    for name, text in (("status", "ask the local agent what it is doing"),
                       ("drain", "admin drain"), ("resume", "end an admin drain")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--url", help="agent address: HOST:PORT or http(s)://HOST:PORT "
                                       "(default: 127.0.0.1 and service.port of the local config, else 8095)")
        cmd.add_argument("--config", type=Path, help="read service.port/host from this file")
        cmd.add_argument("--json", action="store_true", help="print the agent's JSON answer (for machines)")
        if name == "drain":
            cmd.add_argument("--reason", default="admin drain (cli)", help="shown in /status and the logs")
            cmd.add_argument("--wait", action="store_true", help="block until in-flight work is done")
            cmd.add_argument("--timeout", type=float, metavar="S",
                             help=f"seconds to wait with --wait (default {DEFAULT_DRAIN_TIMEOUT_S:g})")
    demo = sub.add_parser("demo", help="the whole lifecycle on embedded simulators")
    demo.add_argument("--duration", type=float, default=45.0, metavar="S", help="seconds (default 45, at least 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    command = None
    try:
        args = build_parser().parse_args(argv)
        command = args.command
        code = _dispatch(args)
        sys.stdout.flush()  # here, so a reader that went away is caught below, not at exit
        return code
    except UsageError as exc:
        _say(str(exc))
        return EXIT_USAGE
    except CommandFailed as exc:
        _say(str(exc))
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (`status | head -2`): what it read is what it wanted.
        _silence_stdout()
        return EXIT_OK
    except KeyboardInterrupt:
        if command in ("drain", "resume"):
            _say("interrupted; whatever the agent was asked to do goes on: `gpu-node-agent status` to see it")
            return EXIT_ERROR
        return EXIT_OK
    except Exception as exc:  # the last line of defence: one line, never a traceback
        _say(f"unexpected error: {type(exc).__name__}: {exc}")
        return EXIT_ERROR


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "run":
        return _run(_config(args.config))
    if args.command == "check-config":
        print(json.dumps(_config(args.config).redacted(), indent=2))
        return EXIT_OK
    if args.command == "demo":
        return _demo(args.duration)
    return _client(args)


def _say(message: str) -> None:
    print(f"gpu-node-agent: {message}", file=sys.stderr, flush=True)


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# --- the daemon and the demo ------------------------------------------------------
def _config(path: Path | None) -> Any:
    from agent.config import ConfigError, load_config

    try:
        return load_config(path)
    except ConfigError as exc:
        raise UsageError(str(exc)) from None


def _run(cfg: Any) -> int:
    import asyncio
    import logging

    from agent.daemon import StartupError
    from agent.limits import raise_fd_limit
    from agent.logs import configure_logging, ensure_standard_fds, stop_logging
    from agent.signals import EarlySignals

    early = EarlySignals()
    early.install()  # from here on no signal kills the process; stop signals wait for the loop
    ensure_standard_fds()
    configure_logging(cfg.logging.level, cfg.logging.format.value)
    raise_fd_limit()
    # A worker thread running Python (psutil on /proc, the log writer) holds the GIL
    # for up to the switch interval before the event loop gets it back: 5 ms by
    # default, which showed as a /readyz p99 of 3.5 ms. 0.5 ms bounds that stall.
    sys.setswitchinterval(0.0005)
    log = logging.getLogger("agent.cli")
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


async def _serve(cfg: Any, pending_signals: list[str]) -> None:
    import asyncio

    from agent.daemon import Daemon

    daemon = Daemon(cfg)
    daemon.install_signal_handlers(asyncio.get_running_loop(), pending_signals)
    await daemon.serve()


def _demo(duration_s: float) -> int:
    from agent.demo import MAX_DURATION_S, MIN_DURATION_S, run_demo

    if not (math.isfinite(duration_s) and MIN_DURATION_S <= duration_s <= MAX_DURATION_S):
        raise UsageError(f"--duration {duration_s:g}: the demo needs at least {MIN_DURATION_S:g} s "
                         f"(and at most {MAX_DURATION_S:g} s)")
    return run_demo(duration_s)


# --- client commands: status, drain, resume -------------------------------------------
def _client(args: argparse.Namespace) -> int:
    from agent import admin_client

    payload = _drain_payload(args) if args.command == "drain" else None  # usage first, then any request
    if args.url is not None:
        try:
            url = admin_client.normalise_url(args.url)
        except admin_client.BadUrl as exc:
            raise UsageError(f"--url {args.url!r}: {exc}; give HOST:PORT or http(s)://HOST:PORT") from None
    else:
        url, notes = admin_client.local_url(args.config)
        if notes:
            _say("; ".join(notes))
    try:
        if args.command == "status":
            return _status(url, args.json)
        return _admin(args, url, payload)
    except admin_client.AgentUnreachable as exc:
        raise CommandFailed(str(exc)) from None


def _drain_payload(args: argparse.Namespace) -> dict[str, Any]:
    reason = args.reason.strip()
    if not reason:
        raise UsageError(f"--reason {args.reason!r}: give a reason (it is shown in /status and the logs)")
    if len(reason) > MAX_REASON_CHARS:
        raise UsageError(f"--reason is {len(reason)} characters long; the agent accepts at most {MAX_REASON_CHARS}")
    if args.timeout is not None and not args.wait:
        raise UsageError(f"--timeout {args.timeout:g} applies only with --wait (without it, drain returns at once)")
    if not args.wait:
        return {"reason": reason}
    timeout_s = DEFAULT_DRAIN_TIMEOUT_S if args.timeout is None else args.timeout
    if not (math.isfinite(timeout_s) and 0 < timeout_s <= MAX_TIMEOUT_S):
        raise UsageError(f"--timeout {timeout_s:g}: give the seconds to wait, more than 0 and at most {MAX_TIMEOUT_S}")
    return {"reason": reason, "wait": True, "timeout": timeout_s}


def _status(url: str, as_json: bool) -> int:
    from agent.admin_client import call

    answer = call("GET", f"{url}/status", timeout_s=STATUS_TIMEOUT_S)
    if answer.status != 200 or not isinstance(answer.body, dict) or "state" not in answer.body:
        error = answer.field("error") or answer.text.strip()[:200]
        raise CommandFailed(f"{url}/status answered HTTP {answer.status}{': ' + error if error else ''}; "
                            "is --url the agent's address?")
    if as_json:
        print(json.dumps(answer.body, indent=2))
    else:
        from agent.status_view import render

        print(render(answer.body))
    return EXIT_OK


def _admin(args: argparse.Namespace, url: str, payload: dict[str, Any] | None) -> int:
    from agent.admin_client import call
    from agent.admin_replies import drain_reply, resume_reply

    if args.command == "drain":
        assert payload is not None
        wait_s = payload.get("timeout")
        answer = call("POST", f"{url}/drain", payload, timeout_s=10 if wait_s is None else wait_s + 10)
        reply = drain_reply(answer, payload["reason"], wait_s)
    else:
        answer = call("POST", f"{url}/resume", {}, timeout_s=10)
        reply = resume_reply(answer)
    if args.json:  # machines get the agent's answer whatever it says; people get the sentence
        body = answer.body if answer.body is not None else {"http_status": answer.status, "text": answer.text}
        print(json.dumps(body, indent=2))
    elif reply.ok:
        print(reply.text)
    for warning in reply.warnings:
        _say(f"warning: {warning}")
    if not reply.ok:
        raise CommandFailed(reply.text)
    return EXIT_OK
