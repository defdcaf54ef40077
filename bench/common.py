"""Shared bench helpers: start the agent as a subprocess, percentiles, a fixed-rate
loopback load generator, and the machine/commit header for RESULTS.md."""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import AgentProcess, until  # after the sys.path line; reused: one way to run the agent

__all__ = ["AgentProcess", "fixed_rate_latencies", "machine_header", "percentile", "until"]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


async def fixed_rate_latencies(url: str, rate_per_s: float, duration_s: float, connections: int = 32) -> tuple[list[float], int]:
    """Open-loop load: request i is due at t0 + i/rate; latency is measured from the
    due time, so a stall shows up (no coordinated omission). Returns (latencies_s, errors)."""
    total = int(rate_per_s * duration_s)
    latencies: list[float] = []
    errors = 0
    sem = asyncio.Semaphore(connections * 4)
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        t0 = time.perf_counter() + 0.05

        async def one(due: float) -> None:
            nonlocal errors
            async with sem:
                try:
                    async with session.get(url) as resp:
                        await resp.read()
                except aiohttp.ClientError:
                    errors += 1
                    return
                latencies.append(time.perf_counter() - due)

        tasks = []
        for i in range(total):
            due = t0 + i / rate_per_s
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
    return latencies, errors


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
