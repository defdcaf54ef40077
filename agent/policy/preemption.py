"""Metadata notices -> drain requests: Spot preemption and host maintenance.

preempted=TRUE drains at once with reason preemption (terminal: no later value undoes
it, unlike GCP's old termination handler); TERMINATE_ON_HOST_MAINTENANCE drains with
reason maintenance; MIGRATE_ON_HOST_MAINTENANCE is recorded (a drain only with
preemption.drain_on_migrate); an upcoming-maintenance window that starts within the
maintenance budget drains now. The metadata source (probes/metadata/source.py) calls
`PreemptionPolicy` with each new value.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from agent.config import DrainConfig, PreemptionConfig
from agent.policy.requests import DrainDesk, DrainRequest
from state_machine import DrainReason, Source

log = logging.getLogger(__name__)

PREEMPTION_EVENT_ID = "gce:instance/preempted=TRUE"  # one preemption per VM life: a repeat is no second drain
TERMINATE = "TERMINATE_ON_HOST_MAINTENANCE"
MIGRATE = "MIGRATE_ON_HOST_MAINTENANCE"


def window_start_wall(info: dict[str, Any] | None) -> float | None:
    """The maintenance window's start (epoch seconds) from an upcoming-maintenance notice."""
    raw = None if info is None else info.get("window_start_time", info.get("windowStartTime"))
    if not isinstance(raw, str):
        return None
    try:
        start = datetime.fromisoformat(raw)  # 3.11 reads the trailing Z
    except ValueError:
        log.warning("unreadable maintenance window start", extra={"value": raw[:60]})
        return None
    return (start if start.tzinfo else start.replace(tzinfo=UTC)).timestamp()


class PreemptionPolicy:
    """The metadata watchers' listener. Callbacks are synchronous and never raise."""

    def __init__(
        self,
        drains: DrainDesk,
        preemption_cfg: PreemptionConfig,
        drain_cfg: DrainConfig,
        *,
        wall: Callable[[], float] = time.time,
        events_len: int = 50,
    ) -> None:
        self._drains = drains
        self._cfg = preemption_cfg
        self._drain = drain_cfg
        self._wall = wall
        self.preempted = False
        self.maintenance_event: str | None = None
        self.upcoming: dict[str, Any] | None = None
        self.events: deque[dict[str, Any]] = deque(maxlen=events_len)

    def preemption_deadline_s(self) -> float:
        return max(0.0, self._cfg.notice_budget_s - self._drain.safety_margin_s)

    def maintenance_deadline_s(self) -> float:
        start = window_start_wall(self.upcoming)
        budget_s = self._cfg.maintenance_budget_s if start is None else start - self._wall()
        return max(0.0, min(self._drain.timeout_s, budget_s) - self._drain.safety_margin_s)

    def on_preempted(self, value: bool, etag: str | None) -> None:
        if not value:
            # FALSE after TRUE is ignored: a preemption is terminal.
            self._record("preempted", "FALSE", "ignored: preemption is terminal" if self.preempted else "none")
            return
        self.preempted = True
        deadline_s = self.preemption_deadline_s()
        started = self._drains.request(
            DrainRequest(
                DrainReason.PREEMPTION,
                source=Source.METADATA,
                deadline_s=deadline_s,
                detail=f"instance/preempted=TRUE: {deadline_s:g}s to drain (notice budget "
                f"{self._cfg.notice_budget_s:g}s - safety margin {self._drain.safety_margin_s:g}s)",
                event_id=PREEMPTION_EVENT_ID,
            )
        )
        self._record("preempted", "TRUE", "drain" if started else "no change: already handled")

    def on_maintenance_event(self, value: str, etag: str | None) -> None:
        self.maintenance_event = value
        if not (value == TERMINATE or (value == MIGRATE and self._cfg.drain_on_migrate)):
            self._record("maintenance_event", value, "recorded")  # NONE never undoes a drain
            return
        deadline_s = self.maintenance_deadline_s()
        window = "" if window_start_wall(self.upcoming) is None else " (window start from upcoming-maintenance)"
        started = self._drains.request(
            DrainRequest(
                DrainReason.MAINTENANCE,
                source=Source.METADATA,
                deadline_s=deadline_s,
                detail=f"instance/maintenance-event={value}: {deadline_s:g}s to drain{window}",
                event_id=f"gce:maintenance-event={value}:{etag}",
            )
        )
        self._record("maintenance_event", value, "drain" if started else "no change: already draining")

    def on_upcoming_maintenance(self, info: dict[str, Any] | None, etag: str | None) -> None:
        """Recorded (its window start sets a maintenance drain's deadline); a notice whose
        window starts within the maintenance budget drains now, as TERMINATE would: GPU
        VMs cannot live-migrate, and maintenance-event may say so only later. A window
        further out is left to maintenance-event, which GCE sends about an hour ahead."""
        self.upcoming = info
        summary = "none" if info is None else " ".join(
            str(info.get(k, "?")) for k in ("type", "maintenance_status", "window_start_time")
        )
        start = window_start_wall(info)
        if start is None or start - self._wall() > self._cfg.maintenance_budget_s:
            self._record("upcoming_maintenance", summary, "recorded")
            return
        deadline_s = self.maintenance_deadline_s()
        started = self._drains.request(
            DrainRequest(
                DrainReason.MAINTENANCE,
                source=Source.METADATA,
                deadline_s=deadline_s,
                detail=f"instance/upcoming-maintenance: window starts in {max(0.0, start - self._wall()):.0f}s; "
                f"{deadline_s:g}s to drain",
                event_id=f"gce:upcoming-maintenance:{info.get('window_start_time', info.get('windowStartTime')) if info else ''}",
            )
        )
        self._record("upcoming_maintenance", summary, "drain" if started else "no change: already draining")

    def describe(self) -> dict[str, Any]:
        return {
            "preempted": self.preempted,
            "maintenance_event": self.maintenance_event,
            "upcoming_maintenance": self.upcoming,
            "events": list(self.events),
        }

    def _record(self, kind: str, value: str, action: str) -> None:
        at = datetime.fromtimestamp(self._wall(), UTC).isoformat()
        self.events.append({"at": at, "kind": kind, "value": value, "action": action})
        level = logging.WARNING if action == "drain" else logging.INFO
        log.log(level, "metadata notice", extra={"kind": kind, "value": value, "action": action})

