"""XidWatcher: XID events from an NVML event set on a thread of its own, handed to
the loop thread as GpuFaults.

Modelled on NVIDIA's k8s-device-plugin (internal/rm/health.go): register every
GPU for XID critical-error events, wait with nvmlEventSetWait_v2 and a 5 s
timeout, skip the application XIDs, and treat any wait error other than a
timeout as every GPU unhealthy. Unlike the device plugin, only the configured
fatal XIDs drain the node; other XIDs are reported (non-fatal GpuFaults).
The thread owns its own nvmlInit/nvmlShutdown pair (NVML counts references),
so stopping it never shuts NVML down under the GPU probe.

Its failures follow every source's rule (probes/base.py): each is counted in
`errors["xid"]` (probe_errors_total{probe="xid"}): a thread that ends failed, a
failing event wait; a crash's traceback is logged at the 1st, 10th and every 100th
in a row. A thread that ends by itself is started again after `retry_s`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import pynvml

from probes.base import worth_logging
from probes.gpu import FaultCallback, FaultKind, GpuFault
from probes.nvml_backend import (
    NvmlBackend,
    describe_error,
    error_name,
    is_lost,
    is_no_driver,
    is_timeout,
)

log = logging.getLogger(__name__)

# Application errors: the GPU is still healthy (k8s-device-plugin's ignored list, less
# 109: NVIDIA's XID catalog gives it a GPU reset, so it is in the default fatal list).
APPLICATION_XIDS = frozenset({13, 31, 43, 45, 68})
RECOVERY_ACTION_CHANGED_XID = 154  # the driver's recovery action for the GPU changed: ask NVML which
# What NVML may ask for (NVML_GPU_RECOVERY_ACTION_*): anything but NONE takes the GPU
# out of service, for an inference node that is a drain (DRAIN_P2P included: tensor
# parallelism talks peer to peer).
_RECOVERY_ACTIONS = {
    pynvml.NVML_GPU_RECOVERY_ACTION_NONE: "none",
    pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET: "gpu_reset",
    pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT: "node_reboot",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P: "drain_p2p",
    pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET: "drain_and_reset",
    getattr(pynvml, "NVML_GPU_RECOVERY_ACTION_BUS_RESET", 6): "bus_reset",
}
# Registered where the GPU supports them: XIDs, and the newer events that name a
# dead GPU or an uncontained memory error outright, and recovery-action changes.
WATCHED_EVENTS = (
    pynvml.nvmlEventTypeXidCriticalError
    | pynvml.nvmlEventTypeGpuUnavailableError
    | pynvml.nvmlEventTypeFatalPoisonError
    | pynvml.nvmlEventTypeGpuRecoveryAction
)


class XidClass(StrEnum):
    FATAL = "fatal"  # drains the node
    REPORTED = "reported"  # a non-fatal fault: shown, counted, no drain
    IGNORED = "ignored"  # an application error


class WatchState(StrEnum):
    STARTING = "starting"
    WATCHING = "watching"
    NO_DRIVER = "no_driver"
    NO_GPU = "no_gpu"
    FAILED = "failed"
    STOPPED = "stopped"


def classify_xid(xid: int, fatal_xids: Iterable[int], ignored_xids: Iterable[int] = APPLICATION_XIDS) -> XidClass:
    """A configured fatal XID wins over the ignore list (an explicit choice)."""
    if xid in set(fatal_xids):
        return XidClass.FATAL
    if xid in set(ignored_xids):
        return XidClass.IGNORED
    return XidClass.REPORTED


@dataclass(frozen=True, slots=True)
class XidEvent:
    xid: int
    klass: XidClass
    gpu_index: int | None
    gpu_uuid: str | None
    at_wall: float


class XidWatcher:
    """`await run()` (under the supervisor) watches until cancelled; `stop()` ends
    the thread with a bounded join. Faults reach `on_fault` on the loop thread."""

    def __init__(
        self,
        nvml: NvmlBackend,
        *,
        on_fault: FaultCallback,
        fatal_xids: Iterable[int],
        ignored_xids: Iterable[int] = APPLICATION_XIDS,
        wait_timeout_ms: int = 5000,
        retry_s: float = 60.0,
        error_pause_s: float = 1.0,
        recent_len: int = 50,
        errors: Counter[str] | None = None,
    ) -> None:
        self._nvml = nvml
        self._errors = errors
        self._crashes = 0  # thread crashes in a row (unexpected exceptions)
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_fault = on_fault
        self.fatal_xids = frozenset(fatal_xids)
        self.ignored_xids = frozenset(ignored_xids) - self.fatal_xids
        self._wait_ms = wait_timeout_ms
        self._retry_s = retry_s
        self._error_pause_s = error_pause_s
        self._stop = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self.state = WatchState.STARTING
        self.detail = ""
        self.gpus_watched: dict[str, int] = {}
        self.events_total: Counter[str] = Counter()
        self.recent: deque[XidEvent] = deque(maxlen=recent_len)
        self._reported: set[str] = set()

    # --- the asyncio side ------------------------------------------------------
    async def run(self) -> None:
        """Watch until cancelled. A thread that ends by itself (no driver, no GPU,
        NVML failing) is started again after `retry_s`."""
        loop = self._loop = asyncio.get_running_loop()
        self._closing = False
        try:
            while not self._closing:
                ended = asyncio.Event()
                self._stop.clear()
                self._thread = threading.Thread(target=self._main, args=(loop, ended), name="nvml-xid", daemon=True)
                self._thread.start()
                await ended.wait()
                if not self._closing:
                    await asyncio.sleep(self._retry_s)
        finally:
            await self.stop()

    async def stop(self, join_timeout_s: float = 1.0) -> bool:
        """Ask the thread to end and wait for it at most `join_timeout_s`. A thread
        still inside an event wait ends by itself within `wait_timeout_ms` (a daemon)."""
        self._closing = True
        self._stop.set()
        thread = self._thread
        if thread is None:
            return True
        try:
            async with asyncio.timeout(join_timeout_s):
                while thread.is_alive():
                    await asyncio.sleep(0.01)
        except TimeoutError:
            log.info("XID watcher still in an event wait; leaving it to end by itself")
            return False
        self.state = WatchState.STOPPED
        return True

    def describe(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "detail": self.detail,
            "gpus_watched": len(self.gpus_watched),
            "fatal_xids": sorted(self.fatal_xids),
            "ignored_xids": sorted(self.ignored_xids),
            "events_total": dict(self.events_total),
            "recent": [
                {"xid": e.xid, "class": e.klass.value, "gpu": e.gpu_index, "uuid": e.gpu_uuid, "at_wall": e.at_wall}
                for e in self.recent
            ],
        }

    def _deliver(self, event: XidEvent | None, fault: GpuFault | None) -> None:
        """Loop thread: bookkeeping, then the callback once per fault id."""
        if event is not None:
            self.recent.append(event)
            self.events_total[event.klass.value] += 1
        if fault is None or fault.event_id in self._reported:
            return
        self._reported.add(fault.event_id)
        try:
            self.on_fault(fault)
        except Exception:
            log.exception("GPU fault listener failed")

    # --- the thread ------------------------------------------------------------
    def _main(self, loop: asyncio.AbstractEventLoop, ended: asyncio.Event) -> None:
        try:
            self._watch(loop)
            self._crashes = 0
        except Exception as exc:
            self._crashes += 1
            self._set_state(WatchState.FAILED, f"{type(exc).__name__}: {exc}")
            if worth_logging(self._crashes):
                log.exception("XID watcher failed", extra={"in_a_row": self._crashes})
        finally:
            _threadsafe(loop, ended.set)

    def _watch(self, loop: asyncio.AbstractEventLoop) -> None:
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except pynvml.NVMLError as exc:
            state = WatchState.NO_DRIVER if is_no_driver(exc) else WatchState.FAILED
            self._set_state(state, f"nvmlInit: {describe_error(exc)}")
            return
        event_set = None
        try:
            event_set = nvml.nvmlEventSetCreate()
            self.gpus_watched = self._register(event_set, loop)
            if not self.gpus_watched:
                self._set_state(WatchState.NO_GPU, "no GPU could be registered for XID events")
                return
            self._set_state(WatchState.WATCHING, f"{len(self.gpus_watched)} GPUs")
            while not self._stop.is_set():
                self._wait_once(event_set, loop)
        except pynvml.NVMLError as exc:
            self._set_state(WatchState.FAILED, describe_error(exc))
        finally:
            self._release(event_set)

    def _register(self, event_set: Any, loop: asyncio.AbstractEventLoop) -> dict[str, int]:
        nvml, watched = self._nvml, {}
        for index in range(nvml.nvmlDeviceGetCount()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                uuid = nvml.nvmlDeviceGetUUID(handle)
                mask = WATCHED_EVENTS & nvml.nvmlDeviceGetSupportedEventTypes(handle)
                if not mask & pynvml.nvmlEventTypeXidCriticalError:
                    raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
                nvml.nvmlDeviceRegisterEvents(handle, mask, event_set)
            except pynvml.NVMLError as exc:
                # The device plugin marks such a GPU unhealthy; we drain only for a lost one.
                kind = FaultKind.LOST if is_lost(exc) else FaultKind.WATCH
                detail = f"gpu {index}: cannot watch XID events: {describe_error(exc)}"
                fault = GpuFault(kind, is_lost(exc), detail, f"xid-register:{index}:{error_name(exc)}", index)
                self._emit(loop, fault=fault)
                continue
            watched[uuid] = index
        return watched

    def _wait_once(self, event_set: Any, loop: asyncio.AbstractEventLoop) -> None:
        try:
            data = self._nvml.nvmlEventSetWait_v2(event_set, self._wait_ms)
        except pynvml.NVMLError as exc:
            if is_timeout(exc):
                return
            detail = f"XID event wait failed: {describe_error(exc)}; every GPU is suspect"
            _threadsafe(loop, self._count_failure)
            self._emit(loop, fault=GpuFault(FaultKind.EVENT_WAIT, True, detail, f"xid-wait:{error_name(exc)}"))
            self._stop.wait(self._error_pause_s)  # a persistent error must not spin
            return
        uuid, index = self._which_gpu(data.device)
        if data.eventType == pynvml.nvmlEventTypeXidCriticalError:
            self._on_xid(int(data.eventData), uuid, index, data.device, loop)
        elif data.eventType == pynvml.nvmlEventTypeGpuRecoveryAction:
            self._on_recovery(int(data.eventData), uuid, index, loop, why="NVML recovery-action event")
        elif data.eventType in (pynvml.nvmlEventTypeGpuUnavailableError, pynvml.nvmlEventTypeFatalPoisonError):
            unavailable = data.eventType == pynvml.nvmlEventTypeGpuUnavailableError
            kind, what = (
                (FaultKind.UNAVAILABLE, "GPU unavailable")
                if unavailable
                else (FaultKind.POISON, "fatal poison (uncontained memory error)")
            )
            detail = f"{what} event on {_where(index)}"
            self._emit(loop, fault=GpuFault(kind, True, detail, f"{kind.value}:{uuid or 'unknown'}", index, uuid))
        else:
            log.debug("skipping an NVML event", extra={"event_type": data.eventType})

    def _on_xid(self, xid: int, uuid: str | None, index: int | None, device: Any, loop: asyncio.AbstractEventLoop) -> None:
        klass = classify_xid(xid, self.fatal_xids, self.ignored_xids)
        event = XidEvent(xid, klass, index, uuid, time.time())
        if klass is XidClass.IGNORED:
            log.info("application XID ignored", extra={"xid": xid, "gpu": index})
            self._emit(loop, event=event)
            return
        if xid == RECOVERY_ACTION_CHANGED_XID and klass is not XidClass.FATAL:
            self._emit(loop, event=event)
            try:
                action = self._nvml.nvmlDeviceGetGpuRecoveryAction(device)
            except pynvml.NVMLError as exc:
                detail = f"XID 154 on {_where(index)}: the recovery action cannot be read ({describe_error(exc)})"
                self._emit(
                    loop, fault=GpuFault(FaultKind.RECOVERY, False, detail, f"xid:{uuid}:154:{error_name(exc)}", index, uuid, xid)
                )
                return
            self._on_recovery(action, uuid, index, loop, why="XID 154")
            return
        detail = f"XID {xid} on {_where(index)}" + ("" if klass is XidClass.FATAL else " (not in the fatal list)")
        fault = GpuFault(FaultKind.XID, klass is XidClass.FATAL, detail, f"xid:{uuid or 'unknown'}:{xid}", index, uuid, xid)
        self._emit(loop, event=event, fault=fault)

    def _on_recovery(
        self, action: int, uuid: str | None, index: int | None, loop: asyncio.AbstractEventLoop, *, why: str
    ) -> None:
        name = _RECOVERY_ACTIONS.get(action, f"action_{action}")
        fatal = action != pynvml.NVML_GPU_RECOVERY_ACTION_NONE
        detail = f"{why} on {_where(index)}: NVML asks for {name}" + ("" if fatal else " (nothing to do)")
        self._emit(loop, fault=GpuFault(FaultKind.RECOVERY, fatal, detail, f"recovery:{uuid or 'unknown'}:{name}", index, uuid))

    def _which_gpu(self, device: Any) -> tuple[str | None, int | None]:
        try:
            uuid = self._nvml.nvmlDeviceGetUUID(device)
        except pynvml.NVMLError as exc:
            log.warning("cannot tell which GPU sent an XID", extra={"error": describe_error(exc)})
            return None, None
        return uuid, self.gpus_watched.get(uuid)

    def _release(self, event_set: Any) -> None:
        try:
            if event_set is not None:
                self._nvml.nvmlEventSetFree(event_set)
        except pynvml.NVMLError as exc:
            log.warning("nvmlEventSetFree failed", extra={"error": describe_error(exc)})
        try:
            self._nvml.nvmlShutdown()
        except pynvml.NVMLError as exc:
            log.warning("nvmlShutdown failed", extra={"error": describe_error(exc)})

    def _count_failure(self) -> None:
        """Loop thread: one failure in probe_errors_total{probe="xid"}."""
        if self._errors is not None:
            self._errors["xid"] += 1

    def _set_state(self, state: WatchState, detail: str) -> None:
        if state is WatchState.FAILED and self._loop is not None:
            _threadsafe(self._loop, self._count_failure)
        if state is not self.state:
            level = logging.WARNING if state is WatchState.FAILED else logging.INFO
            log.log(level, "XID watcher %s", state.value, extra={"detail": detail})
        self.state, self.detail = state, detail

    def _emit(self, loop: asyncio.AbstractEventLoop, *, event: XidEvent | None = None, fault: GpuFault | None = None) -> None:
        # One hand-over for both, so whoever sees the event counted sees its fault too.
        _threadsafe(loop, self._deliver, event, fault)


def _where(index: int | None) -> str:
    return f"gpu {index}" if index is not None else "an unknown GPU"


def _threadsafe(loop: asyncio.AbstractEventLoop, fn: Any, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop closed while this thread was still in a wait
        log.debug("event loop closed; XID watcher result dropped")
