"""The narrow NVML seam: the few pynvml functions the agent uses, behind one Protocol.

`PynvmlBackend` is the real one (nvidia-ml-py); `agent.sim.nvml.FakeNvml` implements
the same Protocol for tests and the demo and raises the real `pynvml.NVMLError`
classes. Also here: naming and classifying NVML errors, without calling into the
library (a wedged driver must not be touched from the event loop thread).
"""

from __future__ import annotations

from typing import Any, Protocol

# Importing pynvml is pure Python: libnvidia-ml is only loaded by nvmlInit(), so
# this works on a machine without a driver.
import pynvml

# nvmlInit fails like this where there is no usable driver: a CPU-only machine,
# a container without the driver mounted, a driver not loaded yet.
NO_DRIVER_CODES = frozenset({pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED})
# The GPU (or the driver under it) is gone: FIELD-NOTES says drain the node.
LOST_CODES = frozenset(
    {pynvml.NVML_ERROR_GPU_IS_LOST, pynvml.NVML_ERROR_RESET_REQUIRED, pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH}
)

_CODE_NAMES: dict[int, str] = {
    getattr(pynvml, attr): attr.removeprefix("NVML_ERROR_") for attr in dir(pynvml) if attr.startswith("NVML_ERROR_")
}


class UtilizationRates(Protocol):
    @property
    def gpu(self) -> int: ...
    @property
    def memory(self) -> int: ...


class MemoryInfo(Protocol):
    @property
    def total(self) -> int: ...
    @property
    def free(self) -> int: ...
    @property
    def used(self) -> int: ...


class EventData(Protocol):
    # pynvml's field names; read-only, so frozen fakes satisfy it too.
    @property
    def device(self) -> Any: ...
    @property
    def eventType(self) -> int: ...
    @property
    def eventData(self) -> int: ...


class NvmlBackend(Protocol):
    """Only what the GPU probe and the XID watcher call, named as in pynvml.

    Every method may raise `pynvml.NVMLError` (a subclass per code) and may block:
    call them from a worker thread, never from the event loop.
    """

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str: ...
    def nvmlDeviceGetName(self, handle: Any) -> str: ...
    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> UtilizationRates: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> MemoryInfo: ...
    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int) -> int: ...
    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int: ...  # milliwatts
    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int: ...
    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]: ...
    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int: ...
    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int: ...
    def nvmlDeviceGetMigMode(self, handle: Any) -> tuple[int, int] | list[int]: ...
    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int: ...
    def nvmlDeviceGetGpuRecoveryAction(self, handle: Any) -> int: ...  # NVML_GPU_RECOVERY_ACTION_*
    def nvmlEventSetCreate(self) -> Any: ...
    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None: ...
    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> EventData: ...
    def nvmlEventSetFree(self, event_set: Any) -> None: ...


class PynvmlBackend:
    """The real NVML through nvidia-ml-py; each method is the pynvml function of
    the same name (the seam keeps pynvml's names so the two read alike)."""

    def nvmlInit(self) -> None:
        pynvml.nvmlInit()

    def nvmlShutdown(self) -> None:
        pynvml.nvmlShutdown()

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(pynvml.nvmlSystemGetDriverVersion())

    def nvmlDeviceGetCount(self) -> int:
        return int(pynvml.nvmlDeviceGetCount())

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        return pynvml.nvmlDeviceGetHandleByIndex(index)

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return str(pynvml.nvmlDeviceGetUUID(handle))

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return str(pynvml.nvmlDeviceGetName(handle))

    def nvmlDeviceGetUtilizationRates(self, handle: Any) -> UtilizationRates:
        return pynvml.nvmlDeviceGetUtilizationRates(handle)

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> MemoryInfo:
        return pynvml.nvmlDeviceGetMemoryInfo(handle)

    def nvmlDeviceGetTemperatureV(self, handle: Any, sensor: int) -> int:
        # The versioned call replaces nvmlDeviceGetTemperature (deprecated in
        # nvidia-ml-py 13, gone with CUDA 14); older drivers only have the old one.
        try:
            return int(pynvml.nvmlDeviceGetTemperatureV(handle, sensor))
        except pynvml.NVMLError_FunctionNotFound:
            return int(pynvml.nvmlDeviceGetTemperature(handle, sensor))

    def nvmlDeviceGetPowerUsage(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetPowerUsage(handle))

    def nvmlDeviceGetTotalEccErrors(self, handle: Any, error_type: int, counter_type: int) -> int:
        return int(pynvml.nvmlDeviceGetTotalEccErrors(handle, error_type, counter_type))

    def nvmlDeviceGetRemappedRows(self, handle: Any) -> tuple[int, int, int, int]:
        corrected, uncorrected, pending, failure = pynvml.nvmlDeviceGetRemappedRows(handle)
        return int(corrected), int(uncorrected), int(pending), int(failure)

    def nvmlDeviceGetRetiredPagesPendingStatus(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetRetiredPagesPendingStatus(handle))

    def nvmlDeviceGetCurrentClocksEventReasons(self, handle: Any) -> int:
        # The "EventReasons" name replaced "ThrottleReasons" (same bits); drivers
        # older than the rename only have the old symbol.
        try:
            return int(pynvml.nvmlDeviceGetCurrentClocksEventReasons(handle))
        except pynvml.NVMLError_FunctionNotFound:
            return int(pynvml.nvmlDeviceGetCurrentClocksThrottleReasons(handle))

    def nvmlDeviceGetMigMode(self, handle: Any) -> list[int]:
        return list(pynvml.nvmlDeviceGetMigMode(handle))

    def nvmlDeviceGetSupportedEventTypes(self, handle: Any) -> int:
        return int(pynvml.nvmlDeviceGetSupportedEventTypes(handle))

    def nvmlDeviceGetGpuRecoveryAction(self, handle: Any) -> int:
        """What the driver asks to be done with the GPU (after XID 154). Newer bindings
        have the call; nvidia-ml-py 13 reads it as field NVML_FI_DEV_GET_GPU_RECOVERY_ACTION."""
        direct = getattr(pynvml, "nvmlDeviceGetGpuRecoveryAction", None)
        if direct is not None:
            return int(direct(handle))
        value = pynvml.nvmlDeviceGetFieldValues(handle, [pynvml.NVML_FI_DEV_GET_GPU_RECOVERY_ACTION])[0]
        if value.nvmlReturn != pynvml.NVML_SUCCESS:
            raise pynvml.NVMLError(value.nvmlReturn)
        return int(value.value.uiVal)

    def nvmlEventSetCreate(self) -> Any:
        return pynvml.nvmlEventSetCreate()

    def nvmlDeviceRegisterEvents(self, handle: Any, event_types: int, event_set: Any) -> None:
        pynvml.nvmlDeviceRegisterEvents(handle, event_types, event_set)

    def nvmlEventSetWait_v2(self, event_set: Any, timeout_ms: int) -> EventData:
        return pynvml.nvmlEventSetWait_v2(event_set, timeout_ms)

    def nvmlEventSetFree(self, event_set: Any) -> None:
        pynvml.nvmlEventSetFree(event_set)


def error_code(exc: BaseException) -> int | None:
    """The NVML return code carried by a pynvml exception, else None."""
    if isinstance(exc, pynvml.NVMLError):
        value = getattr(exc, "value", None)
        return value if isinstance(value, int) else None
    return None


def error_name(exc: BaseException) -> str:
    """`GPU_IS_LOST`, `NOT_SUPPORTED`, ... for an NVML error; the class name otherwise."""
    code = error_code(exc)
    if code is None:
        return type(exc).__name__
    return _CODE_NAMES.get(code, f"NVML_ERROR_{code}")


def describe_error(exc: BaseException) -> str:
    """`NAME: text` without calling into the library: pynvml's own str() asks
    libnvidia-ml for the text of codes it does not know, which can hang."""
    code = error_code(exc)
    if code is None:
        return f"{type(exc).__name__}: {exc}"
    text = pynvml.NVMLError._errcode_to_string.get(code)
    return f"{error_name(exc)}: {text}" if text else error_name(exc)


def is_no_driver(exc: BaseException) -> bool:
    return error_code(exc) in NO_DRIVER_CODES


def is_lost(exc: BaseException) -> bool:
    return error_code(exc) in LOST_CODES


def is_not_supported(exc: BaseException) -> bool:
    return error_code(exc) == pynvml.NVML_ERROR_NOT_SUPPORTED


def is_function_not_found(exc: BaseException) -> bool:
    return error_code(exc) == pynvml.NVML_ERROR_FUNCTION_NOT_FOUND


def is_timeout(exc: BaseException) -> bool:
    return error_code(exc) == pynvml.NVML_ERROR_TIMEOUT
