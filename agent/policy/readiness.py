"""Readiness policy: consecutive health results move WARMING -> READY and READY -> WARMING;
`MetadataHold` keeps a node that may have been preempted from advertising itself READY."""

from __future__ import annotations

import time
from collections.abc import Callable

from agent.core.snapshot import Snapshot
from probes.inference import HealthReading
from probes.metadata import PREEMPTED, PREEMPTED_KEY, MetadataWatch
from state_machine import Lifecycle, State


class ReadinessPolicy:
    """`ready_after` successes in a row make the node READY; `lost_after` failures in a
    row send it back to WARMING. Draining and terminated nodes ignore health."""

    def __init__(
        self, lifecycle: Lifecycle, ready_after: int, lost_after: int, hold: Callable[[], str | None] = lambda: None
    ) -> None:
        """`hold()` names a reason not to become READY yet (e.g. the first metadata read
        is still outstanding on a node that may be preempted), or None."""
        self._hold = hold
        self.held_by: str | None = None
        self._lifecycle = lifecycle
        self._ready_after = ready_after
        self._lost_after = lost_after
        self.successes = 0
        self.failures = 0

    def on_health(self, reading: HealthReading | None, error: str | None) -> None:
        ok = reading is not None and reading.ok
        detail = error or (reading.detail if reading is not None else "no reading")
        if ok:
            self.successes += 1
            self.failures = 0
        else:
            self.failures += 1
            self.successes = 0
        state = self._lifecycle.state
        if state is State.WARMING and self.successes >= self._ready_after:
            self.held_by = self._hold()
            if self.held_by is None:
                self._lifecycle.mark_ready(f"{self.successes} health checks passed in a row")
        elif state is State.READY and self.failures >= self._lost_after:
            self._lifecycle.mark_lost(f"{self.failures} health checks failed in a row: {detail}")


class MetadataHold:
    """Hold READY until instance/preempted has been read once, so an agent restarted on
    a preempted node never advertises it; bounded by `max_s` from the start, since
    unknown is not preempted. `watch` is set once the metadata source runs."""

    def __init__(self, snapshot: Snapshot, *, max_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._snapshot = snapshot
        self._clock = clock
        self._until = clock() + max_s
        self.watch: MetadataWatch | None = None

    def __call__(self) -> str | None:
        watch = self.watch
        if watch is None or self._clock() > self._until:
            return None
        if not watch.settled.is_set():
            return "waiting for the first metadata read"
        if PREEMPTED in watch.watchers and self._snapshot.value(PREEMPTED_KEY, fresh=False) is None:
            return "instance/preempted not read yet"
        return None
