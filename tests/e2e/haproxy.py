"""A real HAProxy in front of the nodes: writes haproxy.cfg (one HTTP backend whose
servers are the nodes' vLLM ports, each health-checked on its agent's /readyz),
runs `haproxy -f cfg -db` in the foreground with its log in a file, and reads the
servers' states from `show stat` on a loopback stats socket."""

from __future__ import annotations

import asyncio
import csv
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.harness import free_port, until

_CFG = """\
global
    nbthread 1
    log stderr format raw local0 info
    stats socket ipv4@127.0.0.1:{stats_port} level admin

defaults
    mode http
    log global
    option httplog
    # Any failure must reach the client: no second try, no other server.
    retries 0
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    # Longer than aiohttp's client keep-alive (15 s), so the client closes idle
    # connections first and never reuses one HAProxy is closing.
    timeout http-keep-alive 30s
    timeout check 1s

frontend inference
    bind 127.0.0.1:{port}
    default_backend vllm

backend vllm
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
    # Which node served the request, as the client sees it.
    http-response set-header X-Served-By %s
    default-server inter {inter_ms}ms fall {fall} rise {rise}
{servers}
"""


@dataclass(frozen=True, slots=True)
class Backend:
    """One node as HAProxy sees it: traffic to vLLM, health from the agent."""

    name: str
    vllm_port: int
    agent_port: int


def haproxy_binary() -> str:
    """The haproxy executable; skips the test (visibly, with -ra) where it is absent."""
    found = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
    if found is None:
        pytest.skip("haproxy not installed (Debian package haproxy)")
    return found


class HAProxy:
    """`await start()`, send traffic to `url`, read `states()`; always `stop()` (finally)."""

    def __init__(self, tmp_path: Path, backends: list[Backend], *, inter_ms: int = 100, fall: int = 2, rise: int = 2) -> None:
        self.binary = haproxy_binary()
        self.inter_ms, self.fall, self.rise = inter_ms, fall, rise
        self.port, self.stats_port = free_port(), free_port()
        self.cfg_path = tmp_path / "haproxy.cfg"
        self.log_path = tmp_path / "haproxy.log"
        servers = "\n".join(f"    server {b.name} 127.0.0.1:{b.vllm_port} check port {b.agent_port}" for b in backends)
        self.cfg_path.write_text(
            _CFG.format(port=self.port, stats_port=self.stats_port, inter_ms=inter_ms, fall=fall, rise=rise, servers=servers)
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout_s: float = 10.0) -> HAProxy:
        # A file, not a pipe: nobody must have to read HAProxy's log for it to go on.
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-f", str(self.cfg_path), "-db"], stdin=subprocess.DEVNULL, stdout=log, stderr=log
            )

        async def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"haproxy exited ({self.proc.returncode}):\n{self.log()}")
            try:
                await self._stats("show info")
            except OSError:
                return False
            return True

        await until(listening, timeout_s, 0.05, "haproxy listening")
        return self

    def stop(self) -> None:
        """Hard stop (SIGTERM), then SIGKILL if it lingers."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def states(self) -> dict[str, str]:
        """Each server's check status as HAProxy holds it: UP, DOWN, or a transition
        such as `UP 1/2` (one failed check, still taking traffic)."""
        return {name: row["status"] for name, row in (await self._rows()).items() if name != "BACKEND"}

    async def errors(self) -> dict[str, int]:
        """HAProxy's own count, for the whole backend, of what went wrong: connection
        and response errors, aborts by a server, 5xx answers, retries, redispatches."""
        backend = (await self._rows())["BACKEND"]
        return {key: int(backend[key] or 0) for key in ("econ", "eresp", "srv_abrt", "hrsp_5xx", "wretr", "wredis")}

    async def _rows(self) -> dict[str, dict[str, str]]:
        """`show stat` for the vllm backend: one row per server, and BACKEND."""
        rows = csv.DictReader((await self._stats("show stat")).removeprefix("# ").splitlines())
        return {row["svname"]: row for row in rows if row["pxname"] == "vllm"}

    async def reaches(self, server: str, status: str, timeout_s: float = 10.0) -> float:
        """Waits until `server` is exactly `status` (UP or DOWN); returns when it was seen."""

        async def there() -> bool:
            return (await self.states()).get(server) == status

        await until(there, timeout_s, 0.02, f"haproxy to hold {server} {status}")
        return time.monotonic()

    async def _stats(self, command: str) -> str:
        reader, writer = await asyncio.open_connection("127.0.0.1", self.stats_port)
        try:
            writer.write(command.encode() + b"\n")
            await writer.drain()
            async with asyncio.timeout(2):
                return (await reader.read()).decode()
        finally:
            writer.close()
            await writer.wait_closed()
