"""The /status document: every reading with its age, staleness and why it is missing."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import os
import threading
import time
from typing import Any

from agent import __version__
from agent.core.snapshot import Reading, Snapshot


def jsonable(value: Any) -> Any:
    """Readings are frozen dataclasses of plain values; make them JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def describe_reading(reading: Reading[Any] | None, now: float) -> dict[str, Any]:
    if reading is None:
        return {"value": None, "age_s": None, "stale": True, "error": "no reading yet", "error_code": "missing"}
    return {"value": jsonable(reading.value), **reading.describe(now)}


def describe_all(snapshot: Snapshot) -> dict[str, Any]:
    now = snapshot.now()
    return {key: describe_reading(reading, now) for key, reading in sorted(snapshot.items())}


def node_status(daemon: Any) -> dict[str, Any]:
    """The whole /status document of a running Daemon."""
    lifecycle = daemon.lifecycle
    drain = lifecycle.drain
    return {
        "state": lifecycle.state.value,
        "since": _iso(lifecycle.since_wall),
        "seconds_in_state": round(lifecycle.seconds_in_state(), 3),
        "reason": lifecycle.reason,
        "ready": lifecycle.is_ready,
        "history": [t.as_dict() for t in list(lifecycle.history)[-50:]],
        "drain": None
        if drain is None
        else {
            "reason": drain.reason.value,
            "source": drain.source.value,
            "detail": drain.detail,
            "started_at": _iso(drain.started_at_wall),
            "deadline_in_s": round(max(0.0, drain.deadline_mono - time.monotonic()), 3),
            "terminal": drain.terminal,
            "drained": drain.drained,
            "progress": daemon.drainer.progress_dict(),
        },
        "termination_report": None if daemon.drainer.report is None else daemon.drainer.report.as_dict(),
        "readings": describe_all(daemon.snapshot),
        "probe_errors": dict(daemon.probe_errors),
        "readiness": {
            "held_by": daemon.readiness.held_by,
            "consecutive_successes": daemon.readiness.successes,
            "consecutive_failures": daemon.readiness.failures,
            "ready_after": daemon.cfg.inference.ready_after,
            "lost_after": daemon.cfg.inference.lost_after,
        },
        "exporter": {"enabled": False} if daemon.exporter is None else daemon.exporter.health(),
        # What this node writes for the series autoscalers scale on (the lifecycle rule applied).
        "autoscaling": {series.value: value for series, value in (daemon.node.now().autoscaling or {}).items()},
        "preemption": {"enabled": daemon.cfg.preemption.enabled, **daemon.preemption.describe()},
        "gpu": {
            "enabled": daemon.cfg.gpu.enabled,
            "faults": daemon.gpu_faults.describe(),
            "nvml": None if daemon.gpu_probe is None else daemon.gpu_probe.describe(),
            "xid": None if daemon.xid_watcher is None else daemon.xid_watcher.describe(),
        },
        "idle": {
            "after_s": daemon.cfg.idle.after_s,
            "idle_for_s": None if daemon.idle.idle_since is None else round(time.monotonic() - daemon.idle.idle_since, 3),
            "action": daemon.cfg.idle.action,
            "action_result": daemon.idle.action_result,
        },
        "tasks": {} if daemon.supervisor is None else daemon.supervisor.describe(),
        "state_file": daemon.persistence.describe(),
        "http": None if daemon.http_guard is None else daemon.http_guard.describe(),
        "systemd": {"notify": daemon.notifier.enabled, "watchdog_interval_s": daemon.notifier.watchdog_interval_s},
        "process": {**_process_figures(), "event_loop_lag": daemon.loop_monitor.describe()},
        "version": __version__,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - daemon.started_mono, 3),
    }


def _process_figures() -> dict[str, Any]:
    """Cheap self-inspection for leak hunting: tasks, threads and open descriptors."""
    try:
        open_fds: int | None = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_fds = None
    return {"asyncio_tasks": len(asyncio.all_tasks()), "threads": threading.active_count(), "open_fds": open_fds}


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
