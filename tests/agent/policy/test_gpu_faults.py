"""GpuFaultPolicy through a real Lifecycle: a fatal GPU fault drains once with
reason gpu_fault; other faults are only recorded; the probe and the XID watcher
on FakeNvml drive it end to end."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.config import DrainConfig, GpuConfig
from agent.policy.gpu_faults import GpuFaultPolicy
from agent.policy.requests import DrainDesk
from agent.sim.nvml import FakeNvml
from probes.gpu import FaultKind, GpuFault
from probes.gpu_probe import GpuProbe
from probes.xid import WatchState, XidWatcher
from state_machine import DrainReason, Lifecycle, Source, State
from tests.harness import until


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fault(event_id: str = "xid:GPU-1:79", *, fatal: bool = True, kind: FaultKind = FaultKind.XID) -> GpuFault:
    return GpuFault(kind, fatal, f"XID 79 on gpu 1 ({event_id})", event_id, 1, "GPU-1", 79)


def make(drain_on_fault: bool = True) -> tuple[Lifecycle, GpuFaultPolicy, Clock]:
    clock = Clock()
    lifecycle = Lifecycle(clock=clock)
    lifecycle.start_warming()
    policy = GpuFaultPolicy(DrainDesk(lifecycle), GpuConfig(drain_on_fault=drain_on_fault), DrainConfig(timeout_s=120))
    return lifecycle, policy, clock



def test_fatal_fault_drains_once_with_reason_gpu_fault() -> None:
    lifecycle, policy, clock = make()
    assert policy.on_fault(fault())
    assert not policy.on_fault(fault())  # the same event again
    assert not policy.on_fault(fault("gpu-lost:GPU-0", kind=FaultKind.LOST))  # a second fault, same drain
    drain = lifecycle.drain
    assert lifecycle.state is State.DRAINING
    assert (drain.reason, drain.source, drain.event_id) == (DrainReason.GPU_FAULT, Source.NVML, "xid:GPU-1:79")
    assert drain.deadline_mono == clock.now + 120 and "XID 79 on gpu 1" in drain.detail
    assert lifecycle.transitions_total[("WARMING", "DRAINING", "gpu_fault")] == 1
    assert len(lifecycle.history) == 2
    assert len(policy.recent) == 3 and policy.faults_total[("lost", True)] == 1


def test_non_fatal_fault_is_recorded_without_a_drain() -> None:
    lifecycle, policy, _ = make()
    assert not policy.on_fault(fault("xid:GPU-1:94", fatal=False))
    assert lifecycle.state is State.WARMING
    assert [f["event_id"] for f in policy.describe()["recent"]] == ["xid:GPU-1:94"]


def test_drain_on_fault_off_records_but_does_not_drain() -> None:
    lifecycle, policy, _ = make(drain_on_fault=False)
    assert not policy.on_fault(fault())
    assert lifecycle.state is State.WARMING and policy.drained_for is None and len(policy.recent) == 1


def test_gpu_fault_takes_over_an_admin_drain() -> None:
    lifecycle, policy, _ = make()
    lifecycle.begin_drain(DrainReason.ADMIN, Source.ADMIN_API, deadline_s=300)
    assert policy.on_fault(fault())
    assert lifecycle.drain.reason is DrainReason.GPU_FAULT and lifecycle.drain.terminal


def test_describe_is_json() -> None:
    _, policy, _ = make()
    policy.on_fault(fault())
    described = json.loads(json.dumps(policy.describe()))
    assert described["drained_for"]["xid"] == 79 and described["drain_on_fault"] is True


async def test_lost_gpu_seen_by_the_probe_drains_the_node() -> None:
    lifecycle, policy, _ = make()
    nvml = FakeNvml(count=2)
    nvml.set(1, lost=True)
    probe = GpuProbe(nvml, on_fault=policy.on_fault)
    reading = await probe.sample()
    await probe.close()
    assert reading.lost_gpus == (1,)
    assert lifecycle.state is State.DRAINING and lifecycle.drain.reason is DrainReason.GPU_FAULT
    assert "gpu 1 lost" in lifecycle.drain.detail


@pytest.mark.parametrize(("xid", "drains"), [(79, True), (13, False)])
async def test_xid_from_the_watcher_drains_only_when_fatal(xid: int, drains: bool) -> None:
    lifecycle, policy, _ = make()
    nvml = FakeNvml(count=1)
    watcher = XidWatcher(nvml, on_fault=policy.on_fault, fatal_xids=GpuConfig().fatal_xids, wait_timeout_ms=20)
    task = asyncio.create_task(watcher.run())
    await until(lambda: watcher.state is WatchState.WATCHING)
    nvml.emit_xid(0, xid)
    await until(lambda: sum(watcher.events_total.values()) == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert (lifecycle.state is State.DRAINING) is drains
