"""Readiness policy: consecutive health results move WARMING -> READY and READY -> WARMING."""

from __future__ import annotations

from collections.abc import Callable

from probes.inference import HealthReading
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
