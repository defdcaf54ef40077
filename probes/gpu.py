"""GPU readings and faults: what the NVML probe and the XID watcher produce, and
the pure logic that summarises them (node aggregates, status, throttle reasons,
row-remapping faults). No I/O here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.core.snapshot import Key

NOT_SUPPORTED = "NOT_SUPPORTED"
NOT_SUPPORTED_MIG = "NOT_SUPPORTED (MIG)"
# A function this driver's NVML does not have (nvidia-ml-py 13 deprecates old calls,
# CUDA 14 drivers remove them): a value that is not available, never a degraded GPU.
NOT_IN_DRIVER = "NOT_SUPPORTED (FUNCTION_NOT_FOUND: not in this driver)"

# nvmlClocksEventReason* bits (same values as the older nvmlClocksThrottleReason*).
THROTTLE_REASON_BITS: tuple[tuple[int, str], ...] = (
    (0x001, "gpu_idle"),
    (0x002, "applications_clocks_setting"),
    (0x004, "sw_power_cap"),
    (0x008, "hw_slowdown"),
    (0x010, "sync_boost"),
    (0x020, "sw_thermal_slowdown"),
    (0x040, "hw_thermal_slowdown"),
    (0x080, "hw_power_brake_slowdown"),
    (0x100, "display_clock_setting"),
    (0x200, "board_limit"),
    (0x400, "reliability"),
)


class GpuStatus(StrEnum):
    OK = "ok"
    NO_DRIVER = "no_driver"  # no libnvidia-ml or driver not loaded: a CPU-only machine
    NO_GPU = "no_gpu"  # NVML works and sees no GPU
    DEGRADED = "degraded"  # a GPU lost, a value failing for a reason other than NOT_SUPPORTED, a memory fault


class FaultKind(StrEnum):
    XID = "xid"
    LOST = "lost"  # GPU_IS_LOST, RESET_REQUIRED, LIB_RM_VERSION_MISMATCH
    ROW_REMAP = "row_remap"  # row remapping failed, or an uncorrectable row waits for a reset
    EVENT_WAIT = "event_wait"  # the XID event wait failed: every GPU is suspect
    WATCH = "watch"  # a GPU cannot be watched for XIDs (reported, never fatal)
    RECOVERY = "recovery"  # NVML asks for a recovery action (XID 154, or its event): reset, reboot, drain
    UNAVAILABLE = "unavailable"  # NVML's GpuUnavailable event: the GPU dropped out
    POISON = "poison"  # NVML's FatalPoison event: an uncontained memory error


@dataclass(frozen=True, slots=True)
class GpuFault:
    """Something wrong with a GPU. `event_id` is stable for the same condition, so
    seeing it again (next sample, a repeated XID) is a no-op downstream."""

    kind: FaultKind
    fatal: bool
    detail: str
    event_id: str
    gpu_index: int | None = None
    gpu_uuid: str | None = None
    xid: int | None = None
    at_wall: float = field(default_factory=time.time)


# What the fault callback returns is ignored (the fault policy says whether it drained).
FaultCallback = Callable[[GpuFault], object]


@dataclass(frozen=True, slots=True)
class GpuInfo:
    """One GPU. A value is None when it could not be read; `unavailable` says why
    (field -> NOT_SUPPORTED, NOT_SUPPORTED (MIG), or the NVML error)."""

    index: int
    uuid: str | None = None
    name: str | None = None
    utilization_percent: float | None = None
    memory_used_bytes: int | None = None
    memory_total_bytes: int | None = None
    temperature_c: float | None = None
    power_w: float | None = None
    ecc_volatile_corrected: int | None = None
    ecc_volatile_uncorrected: int | None = None
    ecc_aggregate_corrected: int | None = None
    ecc_aggregate_uncorrected: int | None = None
    remapped_rows_correctable: int | None = None
    remapped_rows_uncorrectable: int | None = None
    remap_pending: bool | None = None
    remap_failure: bool | None = None
    retired_pages_pending: bool | None = None
    throttle_reasons: tuple[str, ...] = ()
    mig_mode: bool | None = None
    unavailable: dict[str, str] = field(default_factory=dict)
    lost: bool = False
    detail: str = ""


@dataclass(frozen=True, slots=True)
class GpuReading:
    """Every GPU of the node plus the aggregates other code reads (build with `of`)."""

    status: GpuStatus
    detail: str
    gpus: tuple[GpuInfo, ...]
    driver_version: str | None
    gpu_count: int
    utilization_percent_mean: float | None
    memory_used_bytes_total: float
    memory_total_bytes_total: float
    lost_gpus: tuple[int, ...]

    @classmethod
    def of(cls, gpus: Iterable[GpuInfo], *, driver_version: str | None = None) -> GpuReading:
        gpus = tuple(gpus)
        status, detail = gpu_status(gpus)
        return cls(status=status, detail=detail, gpus=gpus, driver_version=driver_version, **aggregates(gpus))

    @classmethod
    def without_gpus(cls, status: GpuStatus, detail: str, *, driver_version: str | None = None) -> GpuReading:
        return cls(status=status, detail=detail, gpus=(), driver_version=driver_version, **aggregates(()))


GPU: Key[GpuReading] = Key("gpu")


def aggregates(gpus: tuple[GpuInfo, ...]) -> dict[str, Any]:
    """Node totals: utilization is the mean over GPUs that report it (a MIG GPU
    does not); lost GPUs count in gpu_count and lost_gpus only."""
    live = [g for g in gpus if not g.lost]
    utilization = [g.utilization_percent for g in live if g.utilization_percent is not None]
    return {
        "gpu_count": len(gpus),
        "utilization_percent_mean": sum(utilization) / len(utilization) if utilization else None,
        "memory_used_bytes_total": float(sum(g.memory_used_bytes or 0 for g in live)),
        "memory_total_bytes_total": float(sum(g.memory_total_bytes or 0 for g in live)),
        "lost_gpus": tuple(g.index for g in gpus if g.lost),
    }


def gpu_status(gpus: tuple[GpuInfo, ...]) -> tuple[GpuStatus, str]:
    if not gpus:
        return GpuStatus.NO_GPU, "NVML sees no GPU"
    problems: list[str] = []
    for gpu in gpus:
        if gpu.lost:
            problems.append(f"gpu {gpu.index} lost ({gpu.detail})")
            continue
        memory = remap_problem(gpu)
        if memory:
            problems.append(f"gpu {gpu.index} {memory}")
        failing = sorted(f for f, why in gpu.unavailable.items() if not why.startswith(NOT_SUPPORTED))
        if failing:
            problems.append(f"gpu {gpu.index} cannot read {', '.join(failing)}")
    return (GpuStatus.DEGRADED, "; ".join(problems)) if problems else (GpuStatus.OK, "")


def remap_problem(gpu: GpuInfo) -> str | None:
    """Row remapping that makes the GPU unfit to keep serving (A100 and later).

    A failed remapping means the bad row stays in use. A pending remapping with
    uncorrectable rows means a row hit by an uncorrectable error (what follows an
    XID 94/95) is only retired at the next GPU reset. Pending remaps from
    correctable errors are routine and left to the next maintenance.
    """
    if gpu.remap_failure:
        return "row remapping failed"
    if gpu.remap_pending and (gpu.remapped_rows_uncorrectable or 0) > 0:
        return f"row remapping pending after {gpu.remapped_rows_uncorrectable} uncorrectable rows (reset needed)"
    return None


def gpu_faults(gpus: Iterable[GpuInfo]) -> list[GpuFault]:
    """Faults a reading shows by itself (lost GPUs, bad row remapping). Run on every
    sample, so the condition is caught at start-up too; ids repeat while it lasts."""
    faults = []
    for gpu in gpus:
        who = gpu.uuid or f"index-{gpu.index}"
        if gpu.lost:
            faults.append(
                GpuFault(FaultKind.LOST, True, f"gpu {gpu.index} lost: {gpu.detail}", f"gpu-lost:{who}", gpu.index, gpu.uuid)
            )
            continue
        problem = remap_problem(gpu)
        if problem:
            event_id = f"gpu-remap-{'failure' if gpu.remap_failure else 'pending'}:{who}"
            faults.append(GpuFault(FaultKind.ROW_REMAP, True, f"gpu {gpu.index} {problem}", event_id, gpu.index, gpu.uuid))
    return faults


def throttle_reason_names(mask: int) -> tuple[str, ...]:
    """Names of the set bits; bits this table does not know come out as hex."""
    names = [name for bit, name in THROTTLE_REASON_BITS if mask & bit]
    known = 0
    for bit, _ in THROTTLE_REASON_BITS:
        known |= bit
    rest = mask & ~known
    bit = 1
    while rest:
        if rest & bit:
            names.append(f"0x{bit:x}")
            rest &= ~bit
        bit <<= 1
    return tuple(names)
