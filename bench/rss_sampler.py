"""A process's resident memory (VmRSS from /proc/<pid>/status), sampled in a task
while a bench runs, with the maximum over any window. Used by bench/bench_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path


def rss_bytes(pid: int) -> int | None:
    """VmRSS now; None once the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None  # a zombie has no VmRSS line


class RssSampler:
    """`async with RssSampler(pid):` samples every `interval_s`; `max_bytes(since, until)`."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int]] = []  # (monotonic s, bytes)
        self.gone_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RssSampler:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _sample(self) -> None:
        while True:
            rss = await asyncio.to_thread(rss_bytes, self.pid)  # /proc reads can be slow on a loaded box
            if rss is None:
                self.gone_at = time.monotonic()
                return
            self.samples.append((time.monotonic(), rss))
            await asyncio.sleep(self.interval_s)

    def max_bytes(self, since: float = 0.0, until: float = float("inf")) -> int | None:
        inside = [rss for at, rss in self.samples if since <= at <= until]
        return max(inside) if inside else None
