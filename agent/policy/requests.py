"""`DrainRequest`: what every source of a drain emits (a signal, an admin call, a
preemption or maintenance notice, a fatal GPU fault, the idle watchdog, a drain
restored from disk); `DrainDesk.request` is the one place a drain is started.

The lifecycle decides what a request does (a higher-priority reason takes a running
drain over, a repeated event id is a no-op, a TERMINATED node ignores it); the desk
is where every request passes, so there is one place to read, log or test them.
"""

from __future__ import annotations

from dataclasses import dataclass

from state_machine import DrainReason, Lifecycle, Source


@dataclass(frozen=True, slots=True)
class DrainRequest:
    """One request to drain: why, in words for /status and the log, how long the drain
    may take, who asks, and a stable id for notices that may repeat."""

    reason: DrainReason
    detail: str
    deadline_s: float
    source: Source
    event_id: str | None = None


class DrainDesk:
    """Takes every DrainRequest to the lifecycle; `lifecycle` is there to read."""

    def __init__(self, lifecycle: Lifecycle) -> None:
        self.lifecycle = lifecycle

    def request(self, request: DrainRequest) -> bool:
        """True when this request started the drain or took it over."""
        return self.lifecycle.begin_drain(
            request.reason,
            request.source,
            deadline_s=request.deadline_s,
            detail=request.detail,
            event_id=request.event_id,
        )
