"""Shared bench helpers: the agent and helper servers as subprocesses, percentiles,
and the machine/commit header for RESULTS.md. The load driver is bench/loadgen.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.proc_sampler import ProcSampler  # noqa: E402 - after the sys.path line
from tests.harness import AgentProcess, status_is, until  # noqa: E402 - after the sys.path line; reused: one way to run the agent

__all__ = [
    "AgentProcess",
    "Child",
    "Subject",
    "agent_under_test",
    "machine_header",
    "percentile",
    "start_child",
    "until",
    "wait_ready",
]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, slots=True)
class Child:
    """A helper server in its own process (`python -m MODULE ...`) and what its
    `listening PORT ...` line said."""

    proc: subprocess.Popen[str]
    port: int
    fields: list[str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


async def start_child(*module_args: str, timeout_s: float = 20.0) -> Child:
    """Start `python -m MODULE_ARGS` and wait for its `listening PORT` line."""
    proc = subprocess.Popen([sys.executable, "-m", *module_args], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(timeout_s):
            line = await asyncio.to_thread(proc.stdout.readline)
        words = line.split()
        if words[:1] != ["listening"]:
            raise RuntimeError(f"{module_args[0]} did not start: {line!r}")
        return Child(proc, int(words[1]), words[2:])
    except BaseException:
        proc.kill()
        proc.wait()
        raise


async def wait_ready(agent: AgentProcess, timeout_s: float = 20.0) -> None:
    """Until the agent's /readyz answers 200."""
    async with aiohttp.ClientSession() as session:
        await until(lambda: status_is(session, f"{agent.url}/readyz", 200), timeout_s, 0.1, "agent READY")


@dataclass
class Subject:
    """A running agent with its sampler; `readyz`/`healthz` are its URLs."""

    agent: AgentProcess
    sampler: ProcSampler

    @property
    def readyz(self) -> str:
        return f"{self.agent.url}/readyz"

    @property
    def healthz(self) -> str:
        return f"{self.agent.url}/healthz"

    def alive(self) -> bool:
        return self.agent.proc is not None and self.agent.proc.poll() is None


@contextlib.asynccontextmanager
async def agent_under_test(
    vllm_url: str, nofile: tuple[int, int] | None = None, settle_s: float = 1.0, poll_interval_s: float = 1.0
) -> AsyncIterator[Subject]:
    """An agent scraping `vllm_url` every `poll_interval_s` (default: every second) with the production inference timeout,
    READY and `settle_s` later, its RSS and descriptors sampled; killed on the way out.
    `nofile`: its RLIMIT_NOFILE (soft, hard), set before it starts."""
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agent.toml"
        argv = None
        if nofile is not None:
            argv = [
                sys.executable,
                "-c",
                _NOFILE_SHIM,
                str(nofile[0]),
                str(nofile[1]),
                "-m",
                "agent",
                "run",
                "--config",
                str(config),
            ]
        settings = {
            "GPU_AGENT_INFERENCE__BASE_URL": vllm_url,
            "GPU_AGENT_INFERENCE__POLL_INTERVAL_S": f"{poll_interval_s:g}",
            "GPU_AGENT_INFERENCE__TIMEOUT_S": "3",
        }
        agent = AgentProcess(Path(tmp), settings, argv=argv).start()
        try:
            await agent.started()
            await wait_ready(agent)
            assert agent.proc is not None
            async with ProcSampler(agent.proc.pid) as sampler:
                await asyncio.sleep(settle_s)  # first scrapes, caches and imports done
                yield Subject(agent, sampler)
        finally:
            agent.kill()


_NOFILE_SHIM = (  # sets the limit, then becomes the agent (same pid: sampled and killed as usual)
    "import os, resource, sys; soft, hard = map(int, sys.argv[1:3]); "
    "resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard)); os.execv(sys.executable, [sys.executable, *sys.argv[3:]])"
)


def machine_header() -> str:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    return (
        f"machine: {platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; commit {commit or 'uncommitted'}"
    )


def summary_line(what: str, result: str, target: str) -> str:
    """A row for the summary table at the top of RESULTS.md (run_all collects these)."""
    return f"<!-- summary: {what} | {result} | {target} -->"


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def median(values: list[float]) -> float:
    return statistics.median(values)
