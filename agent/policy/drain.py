"""The drain: readiness is already 503 when it starts; this task waits out the
propagation delay, then until nothing is in flight for the settle time or the
deadline passes, records completed vs aborted, and ends the drain.

It observes the lifecycle and never runs inside a transition callback.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from agent.config import DrainConfig
from agent.core.snapshot import Snapshot
from probes.base import FailureCode
from probes.vllm import VLLM
from state_machine import Drain, DrainReason, Lifecycle, State

log = logging.getLogger(__name__)

_TICK_S = 0.05
_RECENT_S = 5.0  # how old a reading may be to stand for the notice when none could be taken at it


class DrainOutcome(StrEnum):
    """How a drain ended (the termination report's `outcome` label)."""

    EMPTIED = "emptied"  # nothing in flight for the settle time
    DEADLINE = "deadline"  # the deadline passed with work in flight (counted aborted)
    FORCED = "forced"  # a second stop signal skipped the waiting


class DrainPhase(StrEnum):
    """Where a drain is (/status drain.progress.phase)."""

    PROPAGATION = "propagation"  # load balancers still learning that /readyz is 503
    WAITING = "waiting"  # for in-flight work to finish
    DRAINED = "drained"  # an admin drain emptied the node; it stays cordoned
    DONE = "done"


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What a finished drain did; the termination report is built from it."""

    reason: str
    detail: str
    started_at_wall: float
    finished_at_wall: float
    drain_s: float
    in_flight_at_notice: float | None
    completed: float
    aborted: float
    outcome: DrainOutcome
    failed: float = 0.0  # finished with an error (vLLM's finished_reason="error")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class DrainProgress:
    phase: DrainPhase
    reason: str
    in_flight_at_notice: float | None
    in_flight_now: float | None
    in_flight_known: bool
    empty_for_s: float
    deadline_in_s: float
    completed: float
    aborted: float
    failed: float = 0.0


class InFlightView:
    """In-flight requests as the drain must see them: a fresh count from vLLM's
    metrics, or zero when vLLM refuses connections; unknown otherwise (a hung or
    garbage-answering vLLM is never taken as empty)."""

    def __init__(self, snapshot: Snapshot) -> None:
        self._snapshot = snapshot

    def since(self, t0: float) -> float | None:
        reading = self._snapshot.get(VLLM)
        if reading is None:
            return None
        if reading.failed_with(FailureCode.REFUSED) and reading.failed_at is not None and reading.failed_at >= t0:
            return 0.0
        if reading.taken_at is None or reading.taken_at < t0 or reading.is_stale(self._snapshot.now()):
            return None
        if reading.value is None:
            return None
        return float(reading.value.in_flight)

    def counters(self) -> tuple[float, float, float] | None:
        """Completed, aborted and failed requests since vLLM started."""
        value = self._snapshot.value(VLLM, fresh=False)
        if value is None:
            return None
        failed = float(getattr(value, "requests_failed_total", 0.0))
        return float(value.requests_completed_total), float(value.requests_aborted_total), failed


class DrainController:
    """One long-lived task; `run()` reacts to every drain the lifecycle starts."""

    def __init__(
        self,
        lifecycle: Lifecycle,
        snapshot: Snapshot,
        cfg: DrainConfig,
        *,
        refresh: Callable[[], Awaitable[object]],  # take a vLLM reading now (into the snapshot)
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._lifecycle = lifecycle
        self._cfg = cfg
        self._in_flight = InFlightView(snapshot)
        self._refresh = refresh
        self._clock = clock
        self._wall = wall
        self._changed = asyncio.Event()
        self.force = asyncio.Event()
        self.progress: DrainProgress | None = None
        self.report: DrainReport | None = None
        self._origin: tuple[float, float | None, tuple[float, float, float] | None] | None = None
        lifecycle.subscribe(lambda _t: self._changed.set())

    def skip_waiting(self) -> None:
        """Second signal: stop waiting for propagation and in-flight work."""
        self.force.set()
        self._changed.set()

    async def run(self) -> None:
        while True:
            await self._changed.wait()
            self._changed.clear()
            drain = self._lifecycle.drain
            if self._lifecycle.state is State.DRAINING and drain is not None and not drain.drained:
                await self._drain_once()

    async def _drain_once(self) -> None:
        first = self._lifecycle.drain
        assert first is not None
        if self._origin is None or self._origin[0] != first.started_at_mono:
            # A drain taken over after it emptied (admin drained, then SIGTERM) keeps the
            # notice and baseline of its start, so the report covers the whole drain.
            # Both come from a reading taken at the notice, not one up to a poll old:
            # requests that finished just before it are not the drain's.
            await self._fresh(first)
            notice = self._in_flight.since(first.started_at_mono)
            if notice is None:  # no reading at the notice (cut short, vLLM hung): the last recent one
                notice = self._in_flight.since(first.started_at_mono - _RECENT_S)
            self._origin = (first.started_at_mono, notice, self._in_flight.counters())
        _, notice, baseline = self._origin
        empty_since: float | None = None
        last_known: float | None = notice
        outcome = DrainOutcome.EMPTIED
        while True:
            drain = self._lifecycle.drain
            if self._lifecycle.state is not State.DRAINING or drain is None:
                self.progress = None
                return  # resumed
            now = self._clock()
            propagated_at = drain.started_at_mono + self._cfg.propagation_delay_s
            in_propagation = now < propagated_at
            count = None if in_propagation else self._in_flight.since(propagated_at)
            if count is None and not in_propagation and not self.force.is_set():
                await self._fresh(drain)  # the probe may be backing off: read now
                count = self._in_flight.since(propagated_at)
            if count is not None:
                last_known = count
            if baseline is None and (baseline := self._in_flight.counters()) is not None:
                # No reading at the notice (vLLM unread yet): count from the first one after it.
                self._origin = (self._origin[0], notice, baseline) if self._origin else None
            empty_since = (empty_since or now) if count == 0 else None
            completed, aborted, failed = _deltas(baseline, self._in_flight.counters())
            self.progress = DrainProgress(
                phase=DrainPhase.PROPAGATION if in_propagation else DrainPhase.WAITING,
                reason=drain.reason.value,
                in_flight_at_notice=notice,
                in_flight_now=count,
                in_flight_known=count is not None,
                empty_for_s=0.0 if empty_since is None else now - empty_since,
                deadline_in_s=max(0.0, drain.deadline_mono - now),
                completed=completed,
                aborted=aborted,
                failed=failed,
            )
            if self.force.is_set():
                outcome = DrainOutcome.FORCED
                break
            if empty_since is not None and now - empty_since >= self._cfg.settle_s and await self._still_empty(drain):
                break
            if now >= drain.deadline_mono and drain.terminal:
                outcome = DrainOutcome.DEADLINE
                break
            self._changed.clear()
            try:
                async with asyncio.timeout(_TICK_S):
                    await self._changed.wait()
            except TimeoutError:
                pass
        self._finish(drain, outcome, notice, last_known, baseline)

    async def _still_empty(self, drain: Drain) -> bool:
        """The decision, on a reading taken now: still nothing in flight (and the final
        counters for the report are as of the end)."""
        decided_at = self._clock()
        await self._fresh(drain)
        return self._in_flight.since(decided_at) == 0

    async def _fresh(self, drain: Drain) -> None:
        """Take a reading now; bounded by the probe's own deadline and the drain's, and
        cut short by a second signal."""
        budget_s = drain.deadline_mono - self._clock() if drain.terminal else None
        reading = asyncio.ensure_future(self._refresh())
        forced = asyncio.ensure_future(self.force.wait())
        try:
            timeout = None if budget_s is None else max(0.0, budget_s)
            await asyncio.wait({reading, forced}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in (reading, forced):
                waiter.cancel()
            for waiter in (reading, forced):
                with contextlib.suppress(asyncio.CancelledError):
                    await waiter

    def _finish(
        self,
        drain: Drain,
        outcome: DrainOutcome,
        notice: float | None,
        last_known: float | None,
        baseline: tuple[float, float, float] | None,
    ) -> None:
        completed, aborted, failed = _deltas(baseline, self._in_flight.counters())
        if outcome is not DrainOutcome.EMPTIED:
            aborted += last_known or 0.0
        now_wall = self._wall()
        self.report = DrainReport(
            reason=drain.reason.value,
            detail=drain.detail,
            started_at_wall=drain.started_at_wall,
            finished_at_wall=now_wall,
            drain_s=round(now_wall - drain.started_at_wall, 3),
            in_flight_at_notice=notice,
            completed=completed,
            aborted=aborted,
            outcome=outcome,
            failed=failed,
        )
        log.info("drain finished", extra={"drain": self.report.as_dict()})
        if self.progress is not None:
            self.progress.phase = DrainPhase.DRAINED if drain.reason is DrainReason.ADMIN else DrainPhase.DONE
        if drain.terminal:
            self._lifecycle.terminate(f"{outcome}: completed {completed:g}, aborted {aborted:g}, failed {failed:g}")
        else:
            self._lifecycle.mark_drained()

    def progress_dict(self) -> dict[str, Any] | None:
        return None if self.progress is None else asdict(self.progress)


def _deltas(baseline: tuple[float, float, float] | None, now: tuple[float, float, float] | None) -> tuple[float, float, float]:
    """Completed, aborted and failed since the drain began; a counter that went
    backwards (vLLM restarted) counts from zero."""
    if baseline is None or now is None:
        return 0.0, 0.0, 0.0
    completed, aborted, failed = (
        after - before if after >= before else after for before, after in zip(baseline, now, strict=True)
    )
    return completed, aborted, failed
