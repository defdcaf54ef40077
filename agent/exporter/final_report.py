"""When the termination report is written: as soon as the node is TERMINATED (after a
preemption the VM may be powered off before any signal comes), within what is left
of the notice, and once only: the stop signal that follows waits for the first
flush and gets its result instead of writing the report twice."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from agent.exporter.push_loop import Exporter
from agent.exporter.report import FinishedDrain, TerminationReport
from state_machine import DrainReason, Lifecycle, State, Transition


class FinalReport:
    """`run()` is a task that may finish; `flush()` is the shutdown's first step."""

    def __init__(
        self,
        exporter: Exporter,
        lifecycle: Lifecycle,
        finished_drain: Callable[[], FinishedDrain | None],  # the drain task's report, once it has one
        *,
        notice_budget_s: float,
        default_deadline_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._exporter = exporter
        self._lifecycle = lifecycle
        self._finished_drain = finished_drain
        self._notice_budget_s = notice_budget_s
        self._default_deadline_s = default_deadline_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self._terminated = asyncio.Event()
        lifecycle.subscribe(self._on_transition)

    async def run(self) -> None:
        """Flush once the node is TERMINATED; a preemption's flush gets what is left of
        the notice before power-off, less a second for the OS."""
        if self._lifecycle.state is not State.TERMINATED:
            await self._terminated.wait()
        drain = self._lifecycle.drain
        deadline_s = self._default_deadline_s
        if drain is not None and drain.reason is DrainReason.PREEMPTION:
            notice_end = drain.started_at_mono + self._notice_budget_s
            deadline_s = max(1.0, notice_end - self._clock() - 1.0)
        await self.flush(deadline_s)

    async def flush(self, deadline_s: float) -> bool:
        """The report (if the drain has finished) and the last points; True when written."""
        async with self._lock:
            return await self._exporter.flush_final(self.report(), deadline_s=deadline_s)

    def report(self) -> TerminationReport | None:
        drain = self._finished_drain()
        if drain is None:
            return None
        return TerminationReport.from_drain(drain, transitions=sum(self._lifecycle.transitions_total.values()))

    def _on_transition(self, transition: Transition) -> None:
        if transition.to_state is State.TERMINATED:
            self._terminated.set()
