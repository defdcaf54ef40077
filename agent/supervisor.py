"""The supervisor: one asyncio.TaskGroup owns every background task. A task that
fails is logged, counted and restarted with backoff; it never takes the daemon down.
A task added with `may_finish` is done when it returns (nothing to watch, its one job
done); any other task that returns is restarted like one that failed."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from agent.core.backoff import backoff_s

log = logging.getLogger(__name__)

# A task that ran this long before failing is considered to have been healthy.
_HEALTHY_RUN_S = 60.0


@dataclass(slots=True)
class TaskRecord:
    name: str
    factory: Callable[[], Awaitable[None]]
    critical: bool
    may_finish: bool = False
    restarts: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None
    last_failure_at: float | None = None
    running: bool = False
    finished: bool = False  # a may_finish task that returned
    started_at: float = field(default_factory=time.monotonic)


class Supervisor:
    """`add()` tasks, then `async with supervisor:`; leaving the block cancels them all."""

    def __init__(self, *, backoff_base_s: float = 0.5, backoff_cap_s: float = 30.0) -> None:
        self._group = asyncio.TaskGroup()
        self._records: dict[str, TaskRecord] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._backoff_base_s = backoff_base_s
        self._backoff_cap_s = backoff_cap_s
        self._entered = False

    async def __aenter__(self) -> Supervisor:
        await self._group.__aenter__()
        self._entered = True
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for task in self._tasks:
            task.cancel()
        await self._group.__aexit__(exc_type, exc, tb)

    def add(
        self, name: str, factory: Callable[[], Awaitable[None]], *, critical: bool = False, may_finish: bool = False
    ) -> None:
        """Run `factory()` now and again after each failure. `critical` tasks that
        keep failing make /healthz report the agent broken; a `may_finish` task that
        returns is done (its record says so), not restarted."""
        assert self._entered, "add tasks inside `async with supervisor`"
        record = TaskRecord(name, factory, critical, may_finish)
        self._records[name] = record
        self._tasks.append(self._group.create_task(self._keep_running(record), name=name))

    async def _keep_running(self, record: TaskRecord) -> None:
        while True:
            record.running = True
            record.started_at = time.monotonic()
            try:
                await record.factory()
                if record.may_finish:
                    record.running = False
                    record.finished = True
                    log.debug("task finished", extra={"task": record.name})
                    return
                log.warning("task returned; restarting", extra={"task": record.name})
                error = "returned unexpectedly"
            except Exception as exc:  # broad on purpose: restart, never tear the group down
                error = f"{type(exc).__name__}: {exc}"
                log.exception("task failed; restarting", extra={"task": record.name})
            record.running = False
            if time.monotonic() - record.started_at > _HEALTHY_RUN_S:
                record.consecutive_failures = 0
            record.consecutive_failures += 1
            record.restarts += 1
            record.last_error = error
            record.last_failure_at = time.monotonic()
            await asyncio.sleep(backoff_s(record.consecutive_failures, self._backoff_base_s, self._backoff_cap_s))

    def broken(self) -> list[str]:
        """Critical tasks that are failing over and over (what /healthz reports)."""
        now = time.monotonic()
        return [
            r.name
            for r in self._records.values()
            if r.critical
            and r.consecutive_failures >= 3
            and r.last_failure_at is not None
            and now - r.last_failure_at < _HEALTHY_RUN_S
        ]

    def describe(self) -> dict[str, Any]:
        return {
            r.name: {
                "running": r.running,
                "restarts": r.restarts,
                "last_error": r.last_error,
                "critical": r.critical,
                "finished": r.finished,
            }
            for r in self._records.values()
        }
