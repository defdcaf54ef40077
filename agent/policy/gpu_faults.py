"""GpuFaultPolicy: a fatal GPU fault (fatal XID, lost GPU, bad row remapping, a
failing XID event wait) drains the node with reason gpu_fault; every fault is
kept in a short list for /status and counted for /metrics.

Runs on the loop thread: the GPU probe calls it from its sample, the XID watcher
through `call_soon_threadsafe`.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from typing import Any

from agent.config import DrainConfig, GpuConfig
from agent.policy.requests import DrainDesk, DrainRequest
from probes.gpu import GpuFault
from state_machine import DrainReason, Source

log = logging.getLogger(__name__)


class GpuFaultPolicy:
    def __init__(self, drains: DrainDesk, gpu_cfg: GpuConfig, drain_cfg: DrainConfig, *, recent_len: int = 50) -> None:
        self._drains = drains
        self._gpu_cfg = gpu_cfg
        self._drain_cfg = drain_cfg
        self.recent: deque[GpuFault] = deque(maxlen=recent_len)
        self.faults_total: Counter[tuple[str, bool]] = Counter()  # (kind, fatal)
        self.drained_for: GpuFault | None = None

    def on_fault(self, fault: GpuFault) -> bool:
        """Record the fault; drain once for the first fatal one. True when this call
        started (or took over) the drain."""
        self.recent.append(fault)
        self.faults_total[(fault.kind.value, fault.fatal)] += 1
        if not fault.fatal:
            log.warning("GPU fault (not fatal)", extra={"kind": fault.kind.value, "detail": fault.detail})
            return False
        if not self._gpu_cfg.drain_on_fault:
            log.error("fatal GPU fault; not draining (gpu.drain_on_fault is off)", extra={"detail": fault.detail})
            return False
        if self.drained_for is not None:
            return False
        started = self._drains.request(
            DrainRequest(
                DrainReason.GPU_FAULT,
                source=Source.NVML,
                deadline_s=self._drain_cfg.timeout_s,
                detail=fault.detail,
                event_id=fault.event_id,
            )
        )
        if started:
            self.drained_for = fault
            log.error("fatal GPU fault: draining the node", extra={"kind": fault.kind.value, "detail": fault.detail})
        return started

    def describe(self) -> dict[str, Any]:
        """For /status."""
        return {
            "drain_on_fault": self._gpu_cfg.drain_on_fault,
            "fatal_xids": list(self._gpu_cfg.fatal_xids),
            "drained_for": None if self.drained_for is None else _fault_dict(self.drained_for),
            "recent": [_fault_dict(f) for f in self.recent],
        }


def _fault_dict(fault: GpuFault) -> dict[str, Any]:
    return {
        "kind": fault.kind.value,
        "fatal": fault.fatal,
        "gpu": fault.gpu_index,
        "uuid": fault.gpu_uuid,
        "xid": fault.xid,
        "detail": fault.detail,
        "event_id": fault.event_id,
        "at_wall": fault.at_wall,
    }
