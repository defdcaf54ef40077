"""A process's resident memory (VmRSS from /proc/<pid>/status) and open descriptors
(/proc/<pid>/fd), sampled in a task while a bench runs, with the maximum over any
window. Used by bench/bench_faults.py."""

from __future__ import annotations

import asyncio
import contextlib
import os
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


def open_fds(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None


def nofile_limits(pid: int) -> tuple[str, str]:
    """(soft, hard) "Max open files" as the kernel reports them for `pid`."""
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return soft, hard
    return "?", "?"


class ProcSampler:
    """`async with ProcSampler(pid):` samples every `interval_s`; `max_rss_bytes(since, until)`."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid = pid
        self.interval_s = interval_s
        self.samples: list[tuple[float, int, int]] = []  # (monotonic s, rss bytes, open fds)
        self.gone_at: float | None = None
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> ProcSampler:
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _sample(self) -> None:
        while True:
            rss, fds = await asyncio.to_thread(lambda: (rss_bytes(self.pid), open_fds(self.pid)))  # /proc can be slow
            if rss is None or fds is None:
                self.gone_at = time.monotonic()
                return
            self.samples.append((time.monotonic(), rss, fds))
            await asyncio.sleep(self.interval_s)

    def max_rss_bytes(self, since: float = 0.0, until: float = float("inf")) -> int | None:
        return self._max(1, since, until)

    def max_fds(self, since: float = 0.0, until: float = float("inf")) -> int | None:
        return self._max(2, since, until)

    def _max(self, column: int, since: float, until: float) -> int | None:
        inside = [sample[column] for sample in self.samples if since <= sample[0] <= until]
        return max(inside) if inside else None
