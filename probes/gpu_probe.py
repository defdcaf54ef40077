"""GpuProbe (snapshot key "gpu"): every GPU through NVML, one worker call per GPU.

No driver and no GPU are readings that say so, never an exception loop, so the
agent runs the same on a CPU-only machine. A lost GPU and bad row remapping are
also reported as GpuFaults (once per condition) to the fault callback.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import pynvml

from probes.base import ProbeError
from probes.gpu import (
    GPU,
    NOT_IN_DRIVER,
    NOT_SUPPORTED,
    NOT_SUPPORTED_MIG,
    FaultCallback,
    FaultKind,
    GpuFault,
    GpuInfo,
    GpuReading,
    GpuStatus,
    gpu_faults,
    throttle_reason_names,
)
from probes.nvml_backend import (
    NvmlBackend,
    describe_error,
    error_name,
    is_function_not_found,
    is_lost,
    is_no_driver,
    is_not_supported,
)
from probes.nvml_worker import NvmlWorker

log = logging.getLogger(__name__)

# Without a driver, try nvmlInit again this often (a driver can be loaded later).
NO_DRIVER_RETRY_S = 30.0

_ECC_COUNTERS = (
    ("ecc_volatile_corrected", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_VOLATILE_ECC),
    ("ecc_volatile_uncorrected", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_VOLATILE_ECC),
    ("ecc_aggregate_corrected", pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED, pynvml.NVML_AGGREGATE_ECC),
    ("ecc_aggregate_uncorrected", pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, pynvml.NVML_AGGREGATE_ECC),
)


class _GpuLost(Exception):
    pass


class _GpuReader:
    """Reads one GPU field by field on a worker thread: NOT_SUPPORTED and other
    per-field errors become `unavailable` entries; a lost GPU ends the read."""

    def __init__(self, nvml: NvmlBackend, index: int) -> None:
        self.nvml = nvml
        self.values: dict[str, Any] = {"index": index}
        self.unavailable: dict[str, str] = {}
        self.mig = False

    def read(self, fields: tuple[str, ...], fn: Callable[[], Any]) -> None:
        try:
            result = fn()
        except pynvml.NVMLError as exc:
            if is_lost(exc):
                raise _GpuLost(describe_error(exc)) from None
            if is_not_supported(exc):
                why = NOT_SUPPORTED_MIG if self.mig else NOT_SUPPORTED
            else:
                why = NOT_IN_DRIVER if is_function_not_found(exc) else describe_error(exc)
            self.unavailable.update(dict.fromkeys(fields, why))
            return
        self.values.update(zip(fields, result if len(fields) > 1 else (result,), strict=True))

    def read_all(self) -> GpuInfo:
        nvml = self.nvml
        handle = nvml.nvmlDeviceGetHandleByIndex(self.values["index"])
        self.read(("uuid",), lambda: nvml.nvmlDeviceGetUUID(handle))
        self.read(("name",), lambda: nvml.nvmlDeviceGetName(handle))
        # MIG first: under MIG some values are NOT_SUPPORTED by design, and say so.
        self.read(("mig_mode",), lambda: nvml.nvmlDeviceGetMigMode(handle)[0] == pynvml.NVML_DEVICE_MIG_ENABLE)
        self.mig = bool(self.values.get("mig_mode"))
        self.read(("utilization_percent",), lambda: float(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
        self.read(("memory_used_bytes", "memory_total_bytes"), lambda: _memory(nvml.nvmlDeviceGetMemoryInfo(handle)))
        self.read(("temperature_c",), lambda: float(nvml.nvmlDeviceGetTemperatureV(handle, pynvml.NVML_TEMPERATURE_GPU)))
        self.read(("power_w",), lambda: nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0)
        for name, error_type, counter_type in _ECC_COUNTERS:
            self.read((name,), functools.partial(_ecc_errors, nvml, handle, error_type, counter_type))
        self.read(
            ("remapped_rows_correctable", "remapped_rows_uncorrectable", "remap_pending", "remap_failure"),
            lambda: _remapped(nvml.nvmlDeviceGetRemappedRows(handle)),
        )
        self.read(
            ("retired_pages_pending",),
            lambda: nvml.nvmlDeviceGetRetiredPagesPendingStatus(handle) == pynvml.NVML_FEATURE_ENABLED,
        )
        self.read(("throttle_reasons",), lambda: throttle_reason_names(nvml.nvmlDeviceGetCurrentClocksEventReasons(handle)))
        return GpuInfo(**self.values, unavailable=self.unavailable)


def read_gpu(nvml: NvmlBackend, index: int) -> GpuInfo:
    """Everything about GPU `index`. Blocking: runs on an NVML worker thread."""
    reader = _GpuReader(nvml, index)
    try:
        return reader.read_all()
    except _GpuLost as lost:
        values = reader.values
        return GpuInfo(index=index, uuid=values.get("uuid"), name=values.get("name"), lost=True, detail=str(lost))
    except pynvml.NVMLError as exc:  # the handle itself
        if is_lost(exc):
            return GpuInfo(index=index, lost=True, detail=describe_error(exc))
        raise


def _ecc_errors(nvml: NvmlBackend, handle: Any, error_type: int, counter_type: int) -> int:
    return int(nvml.nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type))


def _memory(info: Any) -> tuple[int, int]:
    return int(info.used), int(info.total)


def _remapped(rows: tuple[int, int, int, int]) -> tuple[int, int, bool, bool]:
    correctable, uncorrectable, pending, failure = rows
    return int(correctable), int(uncorrectable), bool(pending), bool(failure)


class GpuProbe:
    """Probe "gpu": `sample()` returns a GpuReading; `close()` shuts NVML down
    only when no call is still running."""

    name = GPU

    def __init__(
        self,
        nvml: NvmlBackend,
        *,
        interval_s: float = 1.0,
        call_timeout_s: float = 2.0,
        on_fault: FaultCallback | None = None,
        worker: NvmlWorker | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        # Above the per-call deadline, so a hung call is reported as ours ("NVML call
        # ... timed out", then "NVML wedged") rather than as the runner's timeout.
        self.timeout_s = call_timeout_s * 2 + 1
        self.call_timeout_s = call_timeout_s
        self.on_fault = on_fault
        self._nvml = nvml
        self._worker = worker or NvmlWorker(name="nvml-probe")
        self._clock = clock
        self._initialized = False
        self._no_driver: GpuReading | None = None
        self._retry_init_at = 0.0
        self._driver_version: str | None = None
        self._reported: set[str] = set()

    async def sample(self) -> GpuReading:
        if not self._initialized:
            not_ready = await self._init()
            if not_ready is not None:
                return not_ready
        try:
            count = await self._call(self._nvml.nvmlDeviceGetCount)
        except pynvml.NVMLError as exc:
            if not is_lost(exc):
                raise ProbeError(f"nvmlDeviceGetCount: {describe_error(exc)}", code=error_name(exc).lower()) from None
            self._report([_node_lost(exc, "nvmlDeviceGetCount")])
            detail = f"GPUs lost: {describe_error(exc)}"
            return GpuReading.without_gpus(GpuStatus.DEGRADED, detail, driver_version=self._driver_version)
        gpus = [await self._call(read_gpu, self._nvml, index, what=f"read gpu {index}") for index in range(count)]
        self._report(gpu_faults(gpus))
        return GpuReading.of(gpus, driver_version=self._driver_version)

    async def close(self, timeout_s: float = 2.0) -> bool:
        """Stop the worker; True when nvmlShutdown ran (never while a call is stuck)."""
        return await self._worker.close(self._nvml.nvmlShutdown if self._initialized else None, timeout_s=timeout_s)

    def describe(self) -> dict[str, Any]:
        """For /status: whether NVML is up and what is stuck in it."""
        return {
            "initialized": self._initialized,
            "running_calls": self._worker.running_calls,
            "stuck_calls": self._worker.stuck_calls(),
            "faults_reported": sorted(self._reported),
        }

    async def _init(self) -> GpuReading | None:
        """nvmlInit; a reading to return instead when NVML cannot be used."""
        if self._no_driver is not None and self._clock() < self._retry_init_at:
            return self._no_driver
        try:
            await self._call(self._nvml.nvmlInit)
        except pynvml.NVMLError as exc:
            if is_no_driver(exc):
                if self._no_driver is None:
                    log.info("no NVIDIA driver: GPU readings say no_driver", extra={"error": describe_error(exc)})
                self._no_driver = GpuReading.without_gpus(GpuStatus.NO_DRIVER, f"no NVIDIA driver ({describe_error(exc)})")
                self._retry_init_at = self._clock() + NO_DRIVER_RETRY_S
                return self._no_driver
            if is_lost(exc):
                self._report([_node_lost(exc, "nvmlInit")])
                return GpuReading.without_gpus(GpuStatus.DEGRADED, f"nvmlInit: {describe_error(exc)}")
            raise ProbeError(f"nvmlInit: {describe_error(exc)}", code=error_name(exc).lower()) from None
        self._initialized = True
        self._no_driver = None
        try:
            self._driver_version = await self._call(self._nvml.nvmlSystemGetDriverVersion)
        except pynvml.NVMLError as exc:
            log.warning("cannot read the driver version", extra={"error": describe_error(exc)})
        return None

    async def _call(self, fn: Callable[..., Any], *args: Any, what: str = "") -> Any:
        return await self._worker.call(fn, *args, timeout_s=self.call_timeout_s, what=what or fn.__name__)

    def _report(self, faults: Iterable[GpuFault]) -> None:
        for fault in faults:
            if fault.event_id in self._reported:
                continue
            self._reported.add(fault.event_id)
            log.error("GPU fault", extra={"kind": fault.kind.value, "gpu": fault.gpu_index, "detail": fault.detail})
            if self.on_fault is not None:
                try:
                    self.on_fault(fault)
                except Exception:
                    log.exception("GPU fault listener failed")


def _node_lost(exc: BaseException, call: str) -> GpuFault:
    return GpuFault(FaultKind.LOST, True, f"{call}: {describe_error(exc)} (all GPUs)", f"gpu-lost:node:{error_name(exc)}")
