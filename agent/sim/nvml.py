"""FakeNvml: an in-process NVML with settable GPUs, for tests and the demo.

It implements probes.nvml_backend.NvmlBackend and behaves like the real library
where the agent can tell: it raises the real `pynvml.NVMLError` classes (per
call and per GPU), counts nvmlInit/nvmlShutdown references, answers
NOT_SUPPORTED for utilization under MIG, can hang a call until released, and
delivers XID events through event sets to whoever registered for them. It also
records any nvmlShutdown that would unload NVML while another call still runs.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import pynvml

_ALL_EVENTS = (
    pynvml.nvmlEventTypeXidCriticalError | pynvml.nvmlEventTypeDoubleBitEccError | pynvml.nvmlEventTypeSingleBitEccError
    | pynvml.nvmlEventTypeGpuUnavailableError | pynvml.nvmlEventTypeFatalPoisonError | pynvml.nvmlEventTypeGpuRecoveryAction
)
_NO_INSTANCE = 0xFFFFFFFF
_HANG_LIMIT_S = 30.0  # a forgotten release() must not hold a test thread for ever


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA L4"
    utilization_percent: int = 0
    memory_used_bytes: int = 0
    memory_total_bytes: int = 23_034 * 2**20
    temperature_c: int = 35
    power_mw: int = 16_000
    ecc_volatile_corrected: int = 0
    ecc_volatile_uncorrected: int = 0
    ecc_aggregate_corrected: int = 0
    ecc_aggregate_uncorrected: int = 0
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # correctable, uncorrectable, pending, failure
    retired_pages_pending: bool = False
    clocks_event_reasons: int = 0
    mig_mode: int | None = 0  # None: the GPU has no MIG (NOT_SUPPORTED)
    supported_events: int = _ALL_EVENTS
    lost: bool = False  # every call on it raises GPU_IS_LOST
    recovery_action: int = pynvml.NVML_GPU_RECOVERY_ACTION_NONE


@dataclass(frozen=True)
class FakeHandle:
    index: int


@dataclass(frozen=True)
class FakeUtilization:
    gpu: int
    memory: int


@dataclass(frozen=True)
class FakeMemory:
    total: int
    free: int
    used: int


@dataclass(frozen=True)
class FakeEventData:
    device: FakeHandle
    eventType: int  # pynvml's field names
    eventData: int
    gpuInstanceId: int = _NO_INSTANCE
    computeInstanceId: int = _NO_INSTANCE


@dataclass(eq=False)
class FakeEventSet:
    registered: dict[int, int] = field(default_factory=dict)  # gpu index -> event mask
    pending: queue.SimpleQueue[FakeEventData | pynvml.NVMLError] = field(default_factory=queue.SimpleQueue)
    freed: bool = False


@dataclass
class _Rule:
    call: str
    gpu: int | None
    code: int | None  # None: hang
    times: int | None


def fake_uuid(index: int) -> str:
    return f"GPU-{index:08x}-fake-4e56-a7b8-{index:012x}"


class FakeNvml:
    """Settable GPUs (`gpus[i]`, `set()`), injected failures (`fail()`), hangs
    (`hang()` / `release()`) and XID events (`emit_xid()`, `fail_wait()`)."""

    def __init__(self, gpus: list[FakeGpu] | None = None, *, count: int = 1, driver_version: str = "550.90.07") -> None:
        self.gpus: list[FakeGpu] = gpus if gpus is not None else [FakeGpu(fake_uuid(i)) for i in range(count)]
        self.driver_version = driver_version
        self.calls: Counter[str] = Counter()
        self.refcount = 0
        self.shutdowns = 0  # nvmlShutdown calls that brought the count to zero
        self.violations: list[str] = []
        self.event_sets: list[FakeEventSet] = []
        self._rules: list[_Rule] = []
        self._lock = threading.Lock()
        self._active = 0
        self._hanging = 0
        self._released = threading.Event()

    @classmethod
    def without_driver(cls, code: int = pynvml.NVML_ERROR_LIBRARY_NOT_FOUND) -> FakeNvml:
        fake = cls(count=0)
        fake.fail("nvmlInit", code)
        return fake

    # --- control surface ---------------------------------------------------------
    def set(self, index: int, **values: Any) -> None:
        self.gpus[index] = replace(self.gpus[index], **values)

    def set_all(self, **values: Any) -> None:
        for index in range(len(self.gpus)):
            self.set(index, **values)

    def fail(self, call: str, code: int, *, gpu: int | None = None, times: int | None = None) -> None:
        """`call` ("*" for any) raises NVMLError(code), for one GPU or all, `times` times or until cleared."""
        with self._lock:
            self._rules.append(_Rule(call, gpu, code, times))

    def hang(self, call: str, *, gpu: int | None = None) -> None:
        """`call` blocks (like a wedged driver) until `release()`."""
        self._released.clear()
        with self._lock:
            self._rules.append(_Rule(call, gpu, None, None))

    def release(self) -> None:
        with self._lock:
            self._rules = [r for r in self._rules if r.code is not None]
        self._released.set()

    def clear_failures(self) -> None:
        with self._lock:
            self._rules = [r for r in self._rules if r.code is None]

    @property
    def hanging(self) -> int:
        with self._lock:
            return self._hanging

    @property
    def active(self) -> int:
        with self._lock:
            return self._active

    def emit_xid(self, index: int, xid: int) -> int:
        """Deliver an XID to every event set that registered GPU `index` for it."""
        return self.emit_event(index, pynvml.nvmlEventTypeXidCriticalError, xid)

    def emit_event(self, index: int, event_type: int, data: int) -> int:
        delivered = 0
        for event_set in list(self.event_sets):
            if not event_set.freed and event_set.registered.get(index, 0) & event_type:
                event_set.pending.put(FakeEventData(FakeHandle(index), event_type, data))
                delivered += 1
        return delivered

    def fail_wait(self, code: int) -> None:
        """The next wait on every live event set raises NVMLError(code)."""
        for event_set in self.event_sets:
            if not event_set.freed:
                event_set.pending.put(pynvml.NVMLError(code))

    # --- the NVML surface ------------------------------------------------------------
    def nvmlInit(self) -> None:
        with self._call("nvmlInit", initialized=False):
            self.refcount += 1

    def nvmlShutdown(self) -> None:
        with self._call("nvmlShutdown"):
            self.refcount -= 1
            if self.refcount == 0:
                self.shutdowns += 1
                if self._active > 1:
                    self.violations.append(f"nvmlShutdown with {self._active - 1} calls still running")

    def nvmlSystemGetDriverVersion(self) -> str:
        with self._call("nvmlSystemGetDriverVersion"):
            return self.driver_version

    def nvmlDeviceGetCount(self) -> int:
        with self._call("nvmlDeviceGetCount"):
            return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeHandle:
        if not 0 <= index < len(self.gpus):
            raise pynvml.NVMLError(pynvml.NVML_ERROR_INVALID_ARGUMENT)
        with self._call("nvmlDeviceGetHandleByIndex", FakeHandle(index)):
            return FakeHandle(index)

    def nvmlDeviceGetUUID(self, handle: FakeHandle) -> str:
        with self._call("nvmlDeviceGetUUID", handle) as gpu:
            return gpu.uuid

    def nvmlDeviceGetName(self, handle: FakeHandle) -> str:
        with self._call("nvmlDeviceGetName", handle) as gpu:
            return gpu.name

    def nvmlDeviceGetUtilizationRates(self, handle: FakeHandle) -> FakeUtilization:
        with self._call("nvmlDeviceGetUtilizationRates", handle) as gpu:
            if gpu.mig_mode == pynvml.NVML_DEVICE_MIG_ENABLE:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return FakeUtilization(gpu.utilization_percent, 0)

    def nvmlDeviceGetMemoryInfo(self, handle: FakeHandle) -> FakeMemory:
        with self._call("nvmlDeviceGetMemoryInfo", handle) as gpu:
            return FakeMemory(gpu.memory_total_bytes, gpu.memory_total_bytes - gpu.memory_used_bytes, gpu.memory_used_bytes)

    def nvmlDeviceGetTemperatureV(self, handle: FakeHandle, sensor: int) -> int:
        with self._call("nvmlDeviceGetTemperatureV", handle) as gpu:
            return gpu.temperature_c

    def nvmlDeviceGetPowerUsage(self, handle: FakeHandle) -> int:
        with self._call("nvmlDeviceGetPowerUsage", handle) as gpu:
            return gpu.power_mw

    def nvmlDeviceGetTotalEccErrors(self, handle: FakeHandle, error_type: int, counter_type: int) -> int:
        with self._call("nvmlDeviceGetTotalEccErrors", handle) as gpu:
            scope = "volatile" if counter_type == pynvml.NVML_VOLATILE_ECC else "aggregate"
            kind = "corrected" if error_type == pynvml.NVML_MEMORY_ERROR_TYPE_CORRECTED else "uncorrected"
            return int(getattr(gpu, f"ecc_{scope}_{kind}"))

    def nvmlDeviceGetRemappedRows(self, handle: FakeHandle) -> tuple[int, int, int, int]:
        with self._call("nvmlDeviceGetRemappedRows", handle) as gpu:
            return gpu.remapped_rows

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: FakeHandle) -> int:
        with self._call("nvmlDeviceGetRetiredPagesPendingStatus", handle) as gpu:
            return pynvml.NVML_FEATURE_ENABLED if gpu.retired_pages_pending else pynvml.NVML_FEATURE_DISABLED

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: FakeHandle) -> int:
        with self._call("nvmlDeviceGetCurrentClocksEventReasons", handle) as gpu:
            return gpu.clocks_event_reasons

    def nvmlDeviceGetMigMode(self, handle: FakeHandle) -> list[int]:
        with self._call("nvmlDeviceGetMigMode", handle) as gpu:
            if gpu.mig_mode is None:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            return [gpu.mig_mode, gpu.mig_mode]

    def nvmlDeviceGetSupportedEventTypes(self, handle: FakeHandle) -> int:
        with self._call("nvmlDeviceGetSupportedEventTypes", handle) as gpu:
            return gpu.supported_events

    def nvmlDeviceGetGpuRecoveryAction(self, handle: FakeHandle) -> int:
        with self._call("nvmlDeviceGetGpuRecoveryAction", handle) as gpu:
            return gpu.recovery_action

    def nvmlEventSetCreate(self) -> FakeEventSet:
        with self._call("nvmlEventSetCreate"):
            event_set = FakeEventSet()
            self.event_sets.append(event_set)
            return event_set

    def nvmlDeviceRegisterEvents(self, handle: FakeHandle, event_types: int, event_set: FakeEventSet) -> None:
        with self._call("nvmlDeviceRegisterEvents", handle) as gpu:
            if event_types & ~gpu.supported_events:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
            event_set.registered[handle.index] = event_set.registered.get(handle.index, 0) | event_types

    def nvmlEventSetWait_v2(self, event_set: FakeEventSet, timeout_ms: int) -> FakeEventData:
        with self._call("nvmlEventSetWait_v2"):
            try:
                item = event_set.pending.get(timeout=timeout_ms / 1000.0)
            except queue.Empty:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT) from None
            if isinstance(item, pynvml.NVMLError):
                raise item
            return item

    def nvmlEventSetFree(self, event_set: FakeEventSet) -> None:
        with self._call("nvmlEventSetFree"):
            event_set.freed = True

    # --- internals ---------------------------------------------------------------------
    @contextlib.contextmanager
    def _call(self, name: str, handle: FakeHandle | None = None, *, initialized: bool = True) -> Iterator[FakeGpu]:
        gpu_index = None if handle is None else handle.index
        with self._lock:
            self.calls[name] += 1
            self._active += 1
            rule = self._match(name, gpu_index)
        try:
            if rule is not None and rule.code is None:
                self._block()
            elif rule is not None:
                raise pynvml.NVMLError(rule.code)
            if initialized and self.refcount <= 0:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)
            gpu = self.gpus[gpu_index] if gpu_index is not None else None
            if gpu is not None and gpu.lost:
                raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
            yield gpu  # type: ignore[misc]
        finally:
            with self._lock:
                self._active -= 1

    def _match(self, name: str, gpu_index: int | None) -> _Rule | None:
        for rule in self._rules:
            if rule.call in (name, "*") and (rule.gpu is None or rule.gpu == gpu_index):
                if rule.times is not None:
                    rule.times -= 1
                    if rule.times <= 0:
                        self._rules.remove(rule)
                return rule
        return None

    def _block(self) -> None:
        with self._lock:
            self._hanging += 1
        try:
            self._released.wait(_HANG_LIMIT_S)
        finally:
            with self._lock:
                self._hanging -= 1
