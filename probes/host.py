"""HostProbe (snapshot key "host"): CPU %, memory, and the resident memory of the
agent and of the inference server, read with psutil on a thread (the runner puts
its deadline on the call, /proc can be slow on a loaded host).

CPU % is computed here from two `psutil.cpu_times()` readings: psutil's own
non-blocking `cpu_percent()` keeps its "since last call" state per thread, and
`asyncio.to_thread` does not promise the same thread twice.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from agent.core.snapshot import Key

_FIRST_CPU_WINDOW_S = 0.1


@dataclass(frozen=True, slots=True)
class HostReading:
    cpu_percent: float  # whole host, 0-100, since the previous sample
    memory_used_bytes: int  # total - available, the same basis as memory_percent
    memory_total_bytes: int
    memory_percent: float
    agent_rss_bytes: int
    inference_rss_bytes: int | None  # the server's process tree (shared pages count once per process)
    inference_pid: int | None
    inference_note: str  # how it was found, or why not
    inference_processes: int = 0


def cpu_percent_between(before: Any, after: Any) -> float:
    """Busy share of CPU time between two cpu_times() tuples, as psutil counts it:
    guest time is already inside user/nice, iowait is idle, a field that went
    backwards counts as zero."""
    deltas = {f: max(0.0, getattr(after, f) - getattr(before, f)) for f in after._fields}
    total = sum(deltas.values()) - deltas.get("guest", 0.0) - deltas.get("guest_nice", 0.0)
    idle = deltas.get("idle", 0.0) + deltas.get("iowait", 0.0)
    if total <= 0:
        return 0.0
    return round(max(0.0, min(100.0, (total - idle) / total * 100.0)), 1)


def matches_process(needle: str, name: str, cmdline: list[str]) -> bool:
    """The inference server by name: the process name, the program (argv[0]), the
    script run by an interpreter (argv[1]) or a `-m module`. Not any argument:
    `tail -f /var/log/vllm.log` is not vLLM."""
    needle = needle.lower()
    if needle in (name or "").lower():
        return True
    args = [a for a in cmdline or [] if a]
    candidates = [os.path.basename(a) for a in args[:2]]
    candidates += [args[i + 1] for i, a in enumerate(args[:-1]) if a == "-m"]
    return any(needle in c.lower() for c in candidates)


class InferenceProcessFinder:
    """Finds the inference server: by pid file when one is configured (exact),
    otherwise by name, keeping the process found until it exits."""

    def __init__(self, pid_file: Path | None, process_name: str, own_pid: int | None = None) -> None:
        self.pid_file = pid_file
        self.process_name = process_name
        self._own_pid = os.getpid() if own_pid is None else own_pid
        self._cached: psutil.Process | None = None

    def find(self) -> tuple[psutil.Process | None, str]:
        if self.pid_file is not None:
            return self._by_pid_file(self.pid_file)
        if self._cached is not None and self._cached.is_running():
            return self._cached, f"pid {self._cached.pid} by name {self.process_name!r}"
        self._cached = self._by_name()
        if self._cached is None:
            return None, f"no process matches {self.process_name!r} (on GKE the pod needs shareProcessNamespace)"
        return self._cached, f"pid {self._cached.pid} by name {self.process_name!r}"

    def _by_pid_file(self, path: Path) -> tuple[psutil.Process | None, str]:
        try:
            text = path.read_text().strip()
        except OSError as exc:
            return None, f"pid file {path}: {exc.strerror or exc}"
        try:
            pid = int(text.split()[0])
        except (ValueError, IndexError):
            return None, f"pid file {path}: not a pid ({text[:20]!r})"
        try:
            return psutil.Process(pid), f"pid {pid} from {path}"
        except psutil.Error:
            return None, f"pid file {path}: process {pid} is not running"

    def _by_name(self) -> psutil.Process | None:
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["name", "cmdline", "ppid", "create_time"]):
            info = proc.info
            if proc.pid != self._own_pid and matches_process(self.process_name, info["name"], info["cmdline"]):
                found[proc.pid] = proc
        # vLLM's engine and worker processes match too: take the oldest process
        # whose parent is not itself a match (the server, not its children).
        roots = [p for p in found.values() if p.info["ppid"] not in found]
        return min(roots, key=lambda p: p.info["create_time"] or 0.0, default=None)


def tree_rss_bytes(root: psutil.Process) -> tuple[int, int]:
    """RSS of `root` and all its descendants, and how many processes that is."""
    total = root.memory_info().rss
    count = 1
    for child in root.children(recursive=True):
        try:
            total += child.memory_info().rss
            count += 1
        except psutil.Error:  # exited between the listing and the read
            continue
    return total, count


HOST: Key[HostReading] = Key("host")


class HostProbe:
    """Probe "host": one psutil pass per interval on a thread."""

    name = HOST

    def __init__(
        self,
        *,
        interval_s: float = 5.0,
        timeout_s: float = 3.0,
        pid_file: Path | None = None,
        process_name: str = "vllm",
    ) -> None:
        self.interval_s = interval_s
        self.timeout_s = timeout_s
        self._finder = InferenceProcessFinder(pid_file, process_name)
        self._me = psutil.Process()
        self._cpu_before: Any = None

    async def sample(self) -> HostReading:
        return await asyncio.to_thread(self._measure)

    def _measure(self) -> HostReading:
        if self._cpu_before is None:
            # The first sample has no previous reading: measure a short window.
            self._cpu_before = psutil.cpu_times()
            time.sleep(_FIRST_CPU_WINDOW_S)
        cpu_now = psutil.cpu_times()
        cpu = cpu_percent_between(self._cpu_before, cpu_now)
        self._cpu_before = cpu_now
        memory = psutil.virtual_memory()
        rss, pid, count, note = self._inference()
        return HostReading(
            cpu_percent=cpu,
            memory_used_bytes=int(memory.total - memory.available),
            memory_total_bytes=int(memory.total),
            memory_percent=float(memory.percent),
            agent_rss_bytes=int(self._me.memory_info().rss),
            inference_rss_bytes=rss,
            inference_pid=pid,
            inference_note=note,
            inference_processes=count,
        )

    def _inference(self) -> tuple[int | None, int | None, int, str]:
        proc, note = self._finder.find()
        if proc is None:
            return None, None, 0, note
        try:
            rss, count = tree_rss_bytes(proc)
        except psutil.AccessDenied:
            return None, proc.pid, 0, f"{note}: access denied"
        except psutil.Error:
            return None, None, 0, f"{note}: exited"
        return rss, proc.pid, count, note
