"""The pieces bench/bench_faults.py measures with: the unit's limits, a bounded attack
client in its own process, a kubelet-style /healthz prober, a memory guard, and one
attack scenario next to its quiet baseline."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from bench.common import REPO, Subject
from bench.loadgen import LoadResult, drive
from bench.proc_sampler import ProcSampler, nofile_limits

UNIT = REPO / "deploy" / "gce" / "gpu-node-agent.service"
READYZ_RATE_PER_S = 200
_UNITS = {"K": 1024, "M": 1024**2, "G": 1024**3}


def unit_setting(name: str, unit: Path = UNIT) -> str | None:
    """The value of `Name=` in the systemd unit (the last one wins, as in systemd)."""
    found = re.findall(rf"^{name}=(.*)$", unit.read_text(), flags=re.MULTILINE)
    return found[-1].strip() if found else None


def memory_max_bytes(unit: Path = UNIT) -> int:
    raw = unit_setting("MemoryMax", unit) or "512M"
    return int(raw[:-1]) * _UNITS[raw[-1]] if raw[-1] in _UNITS else int(raw)


def unit_nofile(unit: Path = UNIT) -> tuple[int, int, str]:
    """(soft, hard, note): the unit's LimitNOFILE (65536 when it sets none), never
    above what this machine lets a process have."""
    raw = unit_setting("LimitNOFILE", unit)
    soft, _, hard = (raw or "65536").partition(":")
    want = (int(soft), int(hard or soft))
    ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    note = f"LimitNOFILE={raw}" if raw else "the unit sets no LimitNOFILE: 65536"
    if max(want) > ceiling:
        note += f", capped at this machine's hard limit {ceiling}"
    return min(want[0], ceiling), min(want[1], ceiling), note


async def kubelet_probe(url: str, seconds: float, interval_s: float = 0.5, timeout_s: float = 1.0) -> list[tuple[float, bool]]:
    """GET `url` every `interval_s` on a new connection each time, as the kubelet does;
    (monotonic time, answered 200 within timeout_s) per probe."""
    results = []
    end = time.monotonic() + seconds
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        while (now := time.monotonic()) < end:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    results.append((now, resp.status == 200))
            except (aiohttp.ClientError, TimeoutError, OSError):
                results.append((now, False))
            await asyncio.sleep(max(0.0, now + interval_s - time.monotonic()))
    return results


@dataclass
class Attacked:
    """What one attack child reported: `ready` once set up, `done` at the end; and
    whether the bench stopped it early (`stopped`: why and when)."""

    proc: asyncio.subprocess.Process
    ready: dict[str, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    stopped: str | None = None

    def stop(self, why: str) -> None:
        if self.proc.returncode is None and self.stopped is None:
            self.stopped = why
            self.proc.kill()


@contextlib.asynccontextmanager
async def attack_client(kind: str, port: int, seconds: float, *args: str) -> AsyncIterator[Attacked]:
    """`python -m bench.attackers KIND` against loopback `port` for `seconds` once
    ramped; yields when it is ramped, waits for it to end (killed if it overruns)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.attackers", kind, "--port", str(port), "--seconds", f"{seconds:g}", *args,
        cwd=REPO, stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdout is not None
    report = Attacked(proc)
    try:
        async with asyncio.timeout(120):
            report.ready = await _report_line(proc.stdout, "ready")
        yield report
        if report.stopped is None:
            async with asyncio.timeout(seconds + 30):
                report.done = await _report_line(proc.stdout, "done")
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        await proc.wait()


async def _report_line(stdout: asyncio.StreamReader, word: str) -> dict[str, int]:
    while line := await stdout.readline():
        if line.startswith(word.encode() + b" "):
            return json.loads(line.split(b" ", 1)[1])
    raise RuntimeError(f"the attack client ended before saying {word!r}")


@dataclass
class AttackRun:
    """One scenario: /readyz quiet, during and after the attack; /healthz probes; RSS."""

    quiet: LoadResult
    during: LoadResult
    after: LoadResult
    healthz_during: list[tuple[float, bool]]
    healthz_after: list[tuple[float, bool]]
    attack: Attacked
    attack_started: float
    max_rss_quiet_bytes: int | None
    max_rss_bytes: int | None
    max_fds: int | None
    nofile: tuple[str, str]
    alive: bool


async def memory_guard(sampler: ProcSampler, attacked: Attacked, started: float) -> None:
    """Past the unit's MemoryMax systemd would OOM-kill the agent: stop the attack there
    (and spare this shared machine) and say so."""
    ceiling = memory_max_bytes()
    while not (sampler.samples and sampler.samples[-1][1] > ceiling):
        await asyncio.sleep(sampler.interval_s)
    attacked.stop(f"agent RSS over MemoryMax ({ceiling // 2**20} MB) at +{time.monotonic() - started:.1f} s: "
                  "the unit would be OOM-killed; attack stopped")


async def under_attack(subject: Subject, kind: str, quiet_s: float, attack_s: float, after_s: float, *args: str) -> AttackRun:
    """The quiet baseline, then `kind` for `attack_s` with /readyz and /healthz measured
    throughout, then `after_s` once the attack client has gone."""
    nofile = nofile_limits(subject.agent.proc.pid) if subject.agent.proc else ("?", "?")
    quiet = await drive(subject.readyz, READYZ_RATE_PER_S, quiet_s, connections=4)
    started = time.monotonic()
    window_s = max(1.0, attack_s - 1.0)
    async with attack_client(kind, subject.agent.port or 0, attack_s, *args) as attacked:
        guard = asyncio.create_task(memory_guard(subject.sampler, attacked, started))
        try:
            during, healthz_during = await asyncio.gather(
                drive(subject.readyz, READYZ_RATE_PER_S, window_s, connections=4), kubelet_probe(subject.healthz, window_s)
            )
        finally:
            guard.cancel()
    after, healthz_after = await asyncio.gather(
        drive(subject.readyz, READYZ_RATE_PER_S, after_s, connections=4), kubelet_probe(subject.healthz, after_s)
    )
    s = subject.sampler
    return AttackRun(
        quiet, during, after, healthz_during, healthz_after, attacked, started,
        s.max_rss_bytes(until=started), s.max_rss_bytes(), s.max_fds(), nofile, subject.alive(),
    )
