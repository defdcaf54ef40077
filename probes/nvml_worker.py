"""NvmlWorker: every NVML call off the event loop, with a deadline, on a few
dedicated daemon threads.

Why not `asyncio.to_thread`: a wedged driver blocks its calls for ever, and those
calls would hold threads of the default executor that the rest of the agent
needs; ThreadPoolExecutor also joins its threads at interpreter exit, so one stuck
call would keep the process from exiting. Here the threads are daemons, a call
that timed out keeps its thread (it cannot be interrupted), and once `max_stuck`
calls are stuck new calls fail at once ("NVML wedged") instead of queueing.
`close()` refuses to run nvmlShutdown while any call is still running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from probes.base import FailureCode, ProbeError

log = logging.getLogger(__name__)

T = TypeVar("T")

_CLOSE_POLL_S = 0.02


class NvmlCallTimeout(ProbeError):
    """An NVML call passed its deadline; its thread is left to finish (or not)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=FailureCode.TIMEOUT)


class NvmlWedged(ProbeError):
    """Too many NVML calls are stuck: new calls are refused until they return."""

    def __init__(self, message: str) -> None:
        super().__init__(message, code=FailureCode.WEDGED)


@dataclass(eq=False, slots=True)
class _Job:
    what: str
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: concurrent.futures.Future[Any] = field(default_factory=concurrent.futures.Future)
    started_at: float | None = None
    timed_out: bool = False


class NvmlWorker:
    """Runs blocking NVML work on `threads` daemon threads (started on first use)."""

    def __init__(self, *, threads: int = 2, max_stuck: int = 1, name: str = "nvml") -> None:
        if not 1 <= max_stuck <= threads:
            raise ValueError(f"max_stuck ({max_stuck}) must be between 1 and threads ({threads})")
        self._size = threads
        self._max_stuck = max_stuck
        self._name = name
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._running: set[_Job] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._ids = itertools.count()

    # --- read side -------------------------------------------------------------
    @property
    def running_calls(self) -> int:
        with self._lock:
            return len(self._running)

    def stuck_calls(self) -> list[str]:
        """What each call still running past its deadline was doing."""
        with self._lock:
            return sorted(job.what for job in self._running if job.timed_out)

    def threads_started(self) -> int:
        return len(self._threads)

    # --- calls -----------------------------------------------------------------
    async def call(self, fn: Callable[..., T], *args: Any, timeout_s: float, what: str = "") -> T:
        """`fn(*args)` on a worker thread; raises NvmlCallTimeout after `timeout_s`,
        NvmlWedged at once while too many calls are stuck, or what `fn` raised."""
        if self._closed:
            raise ProbeError("NVML worker is closed", code=FailureCode.CLOSED)
        stuck = self.stuck_calls()
        if len(stuck) >= self._max_stuck:
            raise NvmlWedged(f"NVML wedged: {len(stuck)} calls stuck ({', '.join(stuck)})")
        job = _Job(what or getattr(fn, "__name__", "call"), fn, args)
        self._start_threads()
        self._queue.put(job)
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.wrap_future(job.future)
        except TimeoutError:
            with self._lock:
                job.timed_out = True
            # A job still queued never starts (the thread skips cancelled futures);
            # one already running cannot be stopped and now counts as stuck.
            job.future.cancel()
            raise NvmlCallTimeout(f"NVML call {job.what} timed out after {timeout_s:g}s") from None

    async def close(self, final: Callable[[], Any] | None = None, *, timeout_s: float = 2.0) -> bool:
        """Refuse new calls, wait (bounded) for calls in flight, then run `final`
        (nvmlShutdown) only if nothing is running any more. True when it ran."""
        self._closed = True
        try:
            async with asyncio.timeout(timeout_s):
                while self.running_calls and not self.stuck_calls():
                    await asyncio.sleep(_CLOSE_POLL_S)
                if final is None:
                    return False
                if self.running_calls:
                    log.warning("NVML calls still running: not calling nvmlShutdown", extra={"stuck": self.stuck_calls()})
                    return False
                job = _Job("close", final, ())
                self._start_threads()
                self._queue.put(job)
                await asyncio.wrap_future(job.future)
                return True
        except TimeoutError:
            log.warning("NVML did not finish in time: nvmlShutdown not done", extra={"stuck": self.stuck_calls()})
            return False
        except Exception as exc:
            log.warning("nvmlShutdown failed", extra={"error": f"{type(exc).__name__}: {exc}"})
            return False
        finally:
            for _ in self._threads:
                self._queue.put(None)  # threads that are stuck never read it; they are daemons

    # --- threads ---------------------------------------------------------------
    def _start_threads(self) -> None:
        while len(self._threads) < self._size:
            thread = threading.Thread(target=self._serve, name=f"{self._name}-{next(self._ids)}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            with self._lock:
                job.started_at = time.monotonic()
                self._running.add(job)
            try:
                result = job.fn(*job.args)
            except Exception as exc:
                self._finish(job)
                job.future.set_exception(exc)
            else:
                self._finish(job)
                job.future.set_result(result)

    def _finish(self, job: _Job) -> None:
        # Leave the running set before the caller hears back, so a close() that
        # follows the answer sees nothing running.
        with self._lock:
            self._running.discard(job)
        if job.timed_out:
            log.info("a stuck NVML call returned", extra={"call": job.what})
