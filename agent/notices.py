"""Metadata notices -> lifecycle: Spot preemption and host maintenance.

preempted=TRUE drains at once with reason preemption (terminal; no later value
undoes it, unlike GCP's old termination handler); TERMINATE_ON_HOST_MAINTENANCE
drains with reason maintenance; MIGRATE_ON_HOST_MAINTENANCE is recorded (and
drains only with preemption.drain_on_migrate). `run_metadata_watch` is the task
the daemon runs: detect the server, read the identity, watch what it can see.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from datetime import datetime
from typing import Any

from agent.config import DrainConfig, PreemptionConfig
from probes.gce_metadata import (
    MAINTENANCE,
    PREEMPTED,
    UPCOMING,
    MetadataClient,
    MetadataWatcher,
    Presence,
    detect,
    fetch_identity,
    parse_maintenance,
    parse_preempted,
    parse_upcoming,
)
from probes.base import ProbeError
from probes.snapshot import Snapshot
from state_machine import DrainReason, Lifecycle, Source

log = logging.getLogger(__name__)

_REDETECT_S = 60.0
BLIND_NOTE = (
    "GKE Workload Identity's metadata server hides instance/preempted: a Spot preemption "
    "arrives here only as SIGTERM (plus the vLLM preStop drain)"
)


class NoticePolicy:
    def __init__(self, lifecycle: Lifecycle, cfg: PreemptionConfig, drain_cfg: DrainConfig, *, wall=time.time) -> None:
        self._lifecycle = lifecycle
        self._cfg = cfg
        self._drain_cfg = drain_cfg
        self._wall = wall
        self.events: deque[dict[str, Any]] = deque(maxlen=50)
        self.upcoming: dict[str, Any] | None = None
        self.preempted = False

    def on_preempted(self, preempted: bool) -> None:
        self._record("preempted", "TRUE" if preempted else "FALSE")
        if not preempted:
            return  # FALSE never undoes a preemption: it is terminal
        self.preempted = True
        budget_s = self._cfg.notice_budget_s - self._drain_cfg.safety_margin_s
        started = self._lifecycle.begin_drain(
            DrainReason.PREEMPTION,
            Source.METADATA,
            deadline_s=budget_s,
            detail=f"instance/preempted=TRUE; {budget_s:g}s to drain before power-off",
            event_id="preempted:TRUE",  # one preemption per boot: a repeat is no second drain
        )
        log.warning("preemption notice", extra={"drain_started": started, "deadline_s": budget_s})

    def on_maintenance_event(self, value: str) -> None:
        self._record("maintenance-event", value)
        drain = value == "TERMINATE_ON_HOST_MAINTENANCE" or (
            value == "MIGRATE_ON_HOST_MAINTENANCE" and self._cfg.drain_on_migrate
        )
        if not drain:
            return  # NONE and (by default) MIGRATE change nothing and never undo a drain
        budget_s = min(self._drain_cfg.timeout_s, self._time_to_window_s() - self._drain_cfg.safety_margin_s)
        self._lifecycle.begin_drain(
            DrainReason.MAINTENANCE,
            Source.METADATA,
            deadline_s=max(0.0, budget_s),
            detail=f"maintenance-event={value}",
            event_id=f"maintenance:{value}",
        )

    def on_upcoming(self, notice: dict[str, Any] | None) -> None:
        self.upcoming = notice
        if notice is not None:
            self._record("upcoming-maintenance", str(notice.get("maintenance_status", "?")))

    def _time_to_window_s(self) -> float:
        """Time left before the maintenance window starts, from the notice; else the budget."""
        start = (self.upcoming or {}).get("window_start_time")
        if isinstance(start, str):
            try:
                return datetime.fromisoformat(start.replace("Z", "+00:00")).timestamp() - self._wall()
            except ValueError:
                log.warning("unreadable window_start_time", extra={"value": start})
        return self._cfg.maintenance_budget_s

    def _record(self, kind: str, value: str) -> None:
        self.events.append({"at": self._wall(), "kind": kind, "value": value})
        log.info("metadata value", extra={"kind": kind, "value": value})

    def describe(self) -> dict[str, Any]:
        return {"preempted": self.preempted, "upcoming_maintenance": self.upcoming, "events": list(self.events)[-10:]}


async def run_metadata_watch(
    client: MetadataClient, snapshot: Snapshot, policy: NoticePolicy, cfg: PreemptionConfig
) -> None:
    """Detect the server, publish identity and what is watched, then watch for ever.
    In auto mode an absent server means nothing to watch (said in /status); with
    preemption.enabled=false only the identity is read (the exporter's resource labels)."""
    while True:
        try:
            presence = await detect(client)
        except ProbeError as exc:  # the server answered, but badly: unknown, retry
            snapshot.fail("metadata.watch", f"cannot tell what the metadata server serves: {exc}", 120, code=exc.code)
            await asyncio.sleep(5)
            continue
        if presence is not Presence.ABSENT or cfg.enabled != "auto":
            break
        # auto and nothing answers: not on GCE, or the server is down right now; look again later.
        snapshot.put("metadata.watch", {"presence": presence.value, "server": client.base_url, "watching": [],
                                        "blind_to_preemption": True, "note": "no metadata server answered; retrying every 60s"}, 120)
        await asyncio.sleep(_REDETECT_S)
    identity = await fetch_identity(client, presence)
    snapshot.put("metadata.identity", identity, float("inf"))
    watching = _paths(presence, cfg) if cfg.enabled != "false" else []
    watch = {
        "presence": presence.value,
        "server": client.base_url,
        "watching": watching,
        "blind_to_preemption": PREEMPTED not in watching,
        "note": BLIND_NOTE if presence is Presence.RESTRICTED else ("no metadata server answered" if presence is Presence.ABSENT else ""),
    }
    if cfg.enabled == "false":
        watch["note"] = "preemption.enabled=false: identity only, no notices watched"
    if presence is not Presence.PRESENT and cfg.enabled == "true":
        snapshot.fail("metadata.watch", f"preemption.enabled=true but the metadata server is {presence.value}", float("inf"), code=presence.value)
    else:
        snapshot.put("metadata.watch", watch, float("inf"))
    log.info("metadata watch", extra={"watch": watch})
    watchers = _watchers(client, snapshot, policy, cfg, watching)
    if not watchers:
        await asyncio.Event().wait()  # nothing to watch; park (a return would be restarted)
    async with asyncio.TaskGroup() as group:
        for watcher in watchers:
            group.create_task(watcher.run(), name=f"metadata:{watcher.path}")


def _paths(presence: Presence, cfg: PreemptionConfig) -> list[str]:
    if presence is Presence.ABSENT:
        return [] if cfg.enabled == "auto" else [PREEMPTED, MAINTENANCE]
    if presence is Presence.RESTRICTED:
        return [MAINTENANCE, UPCOMING]
    return [PREEMPTED, MAINTENANCE, UPCOMING]


def _watchers(client: MetadataClient, snapshot: Snapshot, policy: NoticePolicy, cfg: PreemptionConfig, paths: list[str]) -> list[MetadataWatcher[Any]]:
    specs = {
        PREEMPTED: (parse_preempted, policy.on_preempted, "metadata.preempted", {}),
        MAINTENANCE: (parse_maintenance, policy.on_maintenance_event, "metadata.maintenance_event", {}),
        UPCOMING: (parse_upcoming, policy.on_upcoming, "metadata.upcoming_maintenance",
                   {"none_codes": frozenset({"http_503", "http_404"}), "backoff_base_s": 10.0}),
    }
    return [
        MetadataWatcher(client, path, parse, on_value, snapshot, key, timeout_sec=cfg.watch_timeout_s, **extra)
        for path in paths
        for parse, on_value, key, extra in [specs[path]]
    ]
