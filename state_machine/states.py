"""The lifecycle's vocabulary: states, drain reasons and trigger sources (SPEC §4)."""

from __future__ import annotations

from enum import StrEnum


class State(StrEnum):
    INIT = "INIT"
    WARMING = "WARMING"
    READY = "READY"
    DRAINING = "DRAINING"
    TERMINATED = "TERMINATED"


class DrainReason(StrEnum):
    """Why a node drains. Order of `DRAIN_PRIORITY` decides which reason wins
    when a second one arrives during a drain."""

    ADMIN = "admin"
    IDLE = "idle"
    SIGNAL = "signal"
    GPU_FAULT = "gpu_fault"
    MAINTENANCE = "maintenance"
    PREEMPTION = "preemption"


# A later trigger with a higher priority takes the drain over (an admin drain hit by
# a preemption becomes a preemption drain); a lower or equal one is a no-op.
DRAIN_PRIORITY: dict[DrainReason, int] = {
    DrainReason.ADMIN: 0,
    DrainReason.IDLE: 1,
    DrainReason.SIGNAL: 2,
    DrainReason.GPU_FAULT: 3,
    DrainReason.MAINTENANCE: 4,
    DrainReason.PREEMPTION: 5,
}

# Reasons after which the node is going away: no resume, TERMINATED at the end.
TERMINAL_REASONS = frozenset(DrainReason) - {DrainReason.ADMIN}


class Source(StrEnum):
    """Who pulled the trigger, recorded with every transition."""

    AGENT = "agent"
    INFERENCE = "inference"
    SIGNAL = "signal"
    ADMIN_API = "admin_api"
    METADATA = "metadata"
    NVML = "nvml"
    IDLE_WATCHDOG = "idle_watchdog"
    DRAIN = "drain"
    STATE_FILE = "state_file"
