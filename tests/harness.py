"""Test harness: a real `gpu-node-agent run` subprocess, its JSON log lines, and
polling helpers that wait on a condition with a deadline (never a bare sleep)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parent.parent


def inprocess_config(tmp_path: Path, vllm_url: str | None = None, **env: str) -> Any:
    """The config of a Daemon run inside the test's own loop: loopback, an ephemeral
    port, a fresh state dir, no export and no metadata server; a vLLM polled briskly
    with short drains when `vllm_url` is given. `env`: more GPU_AGENT_ settings."""
    from agent.config import load_config

    settings = {
        "GPU_AGENT_SERVICE__HOST": "127.0.0.1",
        "GPU_AGENT_SERVICE__PORT": "0",
        "GPU_AGENT_SERVICE__STATE_DIR": str(tmp_path / "state"),
        "GPU_AGENT_EXPORT__ENABLED": "false",
        "GPU_AGENT_PREEMPTION__ENABLED": "false",
    }
    if vllm_url is not None:
        settings |= {
            "GPU_AGENT_INFERENCE__BASE_URL": vllm_url,
            "GPU_AGENT_INFERENCE__POLL_INTERVAL_S": "0.1",
            "GPU_AGENT_DRAIN__PROPAGATION_DELAY_S": "0.1",
            "GPU_AGENT_DRAIN__SETTLE_S": "0.1",
        }
    return load_config(None, settings | env)


def free_port() -> int:
    """A loopback port nothing listens on now (the OS picks it), for a server that must
    keep one fixed port across restarts."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(condition: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.02, what: str = "") -> Any:
    """Poll `condition` (sync or async) until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if isinstance(value, Awaitable):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what or condition}")
        await asyncio.sleep(interval_s)


class AgentProcess:
    """`python -m agent run` with a config file and env; parses its stdout JSON logs."""

    def __init__(
        self,
        tmp_path: Path,
        settings: dict[str, str],
        *,
        config_text: str = "",
        extra_env: dict[str, str] | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.argv = argv
        self.tmp_path = tmp_path
        self.config_path = tmp_path / "agent.toml"
        self.config_path.write_text(config_text)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("GPU_AGENT_", "NOTIFY_SOCKET", "WATCHDOG_"))}
        self.env.update(
            {
                "GPU_AGENT_SERVICE__HOST": "127.0.0.1",
                "GPU_AGENT_SERVICE__PORT": "0",
                "GPU_AGENT_SERVICE__STATE_DIR": str(tmp_path / "state"),
                "GPU_AGENT_EXPORT__ENABLED": "false",
                "GPU_AGENT_PREEMPTION__ENABLED": "false",
                "GPU_AGENT_GPU__ENABLED": "false",
                "GPU_AGENT_INFERENCE__POLL_INTERVAL_S": "0.1",
                "GPU_AGENT_INFERENCE__TIMEOUT_S": "0.5",
                "GPU_AGENT_DRAIN__PROPAGATION_DELAY_S": "0.3",
                "GPU_AGENT_DRAIN__SETTLE_S": "0.3",
                "PYTHONUNBUFFERED": "1",
                # Tests talk to loopback only: no DNS lookup of metadata.google.internal.
                "GCE_METADATA_HOST": "127.0.0.1:9",
            }
        )
        self.env.update(settings)
        self.env.update(extra_env or {})
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.proc: subprocess.Popen[str] | None = None
        self.port: int | None = None
        self._lock = threading.Lock()

    def start(self) -> AgentProcess:
        self.proc = subprocess.Popen(
            self.argv or [sys.executable, "-m", "agent", "run", "--config", str(self.config_path)],
            cwd=REPO,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._lock:
                self.raw.append(line)
                try:
                    entry = json.loads(line)
                except ValueError:
                    continue
                self.lines.append(entry)
                if entry.get("message") == "agent started":
                    self.port = entry["port"]

    async def started(self, timeout_s: float = 15.0) -> AgentProcess:
        await until(lambda: self.port is not None or (self.proc and self.proc.poll() is not None), timeout_s, what="agent start")
        if self.port is None:
            raise AssertionError(f"agent exited early ({self.proc.returncode}):\n{self.output()}")
        return self

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        with self._lock:
            return "".join(self.raw)

    def logs(self, message: str | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [e for e in self.lines if message is None or e.get("message") == message]

    def send(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def exited(self, timeout_s: float = 20.0) -> int:
        assert self.proc is not None
        await until(lambda: self.proc.poll() is not None, timeout_s, what="agent exit")
        return self.proc.returncode

    def kill(self) -> None:
        """Stop the process if still running and release its pipe (always call, e.g. in finally)."""
        if self.proc is not None:
            reap(self.proc, self._reader)


def reap(proc: subprocess.Popen[str], reader: threading.Thread) -> None:
    """Kill `proc` if it still runs, let its stdout reader finish, close the pipe."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(timeout=10)
    reader.join(timeout=5)
    if proc.stdout is not None:
        proc.stdout.close()


async def run_cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    """`gpu-node-agent ARGS` as a user runs it: a subprocess (the test's loop keeps serving
    the fakes meanwhile), with its exit code, stdout and stderr; no GPU_AGENT_ variables
    leak in from the test's environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPU_AGENT_")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", *args, cwd=REPO, env={**base, **(env or {})},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"gpu-node-agent {' '.join(args)} did not finish within {timeout_s}s") from None
    return subprocess.CompletedProcess(list(args), proc.returncode, out.decode(), err.decode())


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with session.get(url) as resp:
        return resp.status, await resp.json(content_type=None)


async def post_json(
    session: aiohttp.ClientSession, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    async with session.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.json(content_type=None)


async def state_of(session: aiohttp.ClientSession, agent: AgentProcess) -> str:
    _, body = await get_json(session, f"{agent.url}/status")
    return body["state"]


async def status_is(session: aiohttp.ClientSession, url: str, expected: int) -> bool:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status == expected


async def sees_in_flight(session: aiohttp.ClientSession, agent: AgentProcess) -> bool:
    """The agent's own view: a fresh vLLM reading with something running or waiting."""
    _, full = await get_json(session, f"{agent.url}/status")
    value = full["readings"].get("vllm", {}).get("value")
    return bool(value and value["in_flight"] > 0)


async def time_to_first_503(session: aiohttp.ClientSession, url: str, trigger: Callable[[], Any], limit_s: float = 5.0) -> float:
    """Seconds from `trigger()` (sync or async) to the first 503 from `url`, polling back to back."""
    started = time.perf_counter()
    result = trigger()
    if isinstance(result, Awaitable):
        await result
    while not await status_is(session, url, 503):
        if time.perf_counter() - started > limit_s:
            raise AssertionError(f"no 503 from {url} within {limit_s}s")
    return time.perf_counter() - started
