"""The XID watcher on FakeNvml: fatal XIDs fault once, application XIDs are
ignored, a failing event wait makes every GPU suspect, and it stops cleanly."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pynvml
import pytest

from agent.sim.nvml import FakeNvml
from probes.gpu import FaultKind, GpuFault
from probes.gpu_probe import GpuProbe
from probes.xid import APPLICATION_XIDS, WatchState, XidClass, XidWatcher, classify_xid
from tests.harness import until

FATAL = [48, 79, 95, 109]



class Running:
    def __init__(self, fake: FakeNvml, watcher: XidWatcher, task: asyncio.Task[None], faults: list[GpuFault]) -> None:
        self.fake, self.watcher, self.task, self.faults = fake, watcher, task, faults


async def start(fake: FakeNvml, **kwargs) -> Running:
    faults: list[GpuFault] = []
    options = {"fatal_xids": FATAL, "wait_timeout_ms": 20, "retry_s": 0.05, "error_pause_s": 0.05, **kwargs}
    watcher = XidWatcher(fake, on_fault=faults.append, **options)
    task = asyncio.create_task(watcher.run())
    return Running(fake, watcher, task, faults)


async def stop(running: Running) -> None:
    running.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running.task


@pytest.fixture
async def watching() -> AsyncIterator[Running]:
    running = await start(FakeNvml(count=2))
    await until(lambda: running.watcher.state is WatchState.WATCHING)
    yield running
    await stop(running)


@pytest.mark.parametrize(
    ("xid", "expected"),
    [
        (79, XidClass.FATAL),
        (13, XidClass.IGNORED),
        (31, XidClass.IGNORED),
        (94, XidClass.REPORTED),
        (109, XidClass.FATAL),  # NVIDIA's catalog: a GPU reset (the device plugin ignores it)
        (45, XidClass.IGNORED),
    ],
)
def test_xids_are_classified_fatal_ignored_or_reported(xid: int, expected: XidClass) -> None:
    assert classify_xid(xid, FATAL, APPLICATION_XIDS) is expected


async def test_fatal_xid_fires_the_fault_callback_once(watching: Running) -> None:
    assert watching.fake.emit_xid(1, 79) == 1
    watching.fake.emit_xid(1, 79)
    await until(lambda: watching.watcher.events_total["fatal"] == 2)
    assert len(watching.faults) == 1
    fault = watching.faults[0]
    assert (fault.kind, fault.fatal, fault.xid, fault.gpu_index) == (FaultKind.XID, True, 79, 1)
    assert fault.gpu_uuid == watching.fake.gpus[1].uuid and "XID 79 on gpu 1" in fault.detail


async def test_application_xid_is_ignored(watching: Running) -> None:
    watching.fake.emit_xid(0, 13)
    await until(lambda: watching.watcher.events_total["ignored"] == 1)
    assert watching.faults == []
    assert watching.watcher.describe()["recent"][0]["class"] == "ignored"


async def test_xid_outside_the_fatal_list_is_reported_but_not_fatal(watching: Running) -> None:
    watching.fake.emit_xid(0, 94)
    await until(lambda: len(watching.faults) == 1)
    assert (watching.faults[0].xid, watching.faults[0].fatal) == (94, False)


def test_xid_109_is_fatal_by_default() -> None:
    from agent.config import GpuConfig

    assert 109 in GpuConfig().fatal_xids and 109 not in APPLICATION_XIDS


@pytest.mark.parametrize(
    ("action", "fatal", "name"),
    [
        (pynvml.NVML_GPU_RECOVERY_ACTION_GPU_RESET, True, "gpu_reset"),
        (pynvml.NVML_GPU_RECOVERY_ACTION_NODE_REBOOT, True, "node_reboot"),
        (pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_P2P, True, "drain_p2p"),
        (pynvml.NVML_GPU_RECOVERY_ACTION_NONE, False, "none"),
    ],
)
async def test_xid_154_is_acted_on_through_the_recovery_action_nvml_reports(
    watching: Running, action: int, fatal: bool, name: str
) -> None:
    watching.fake.set(1, recovery_action=action)
    watching.fake.emit_xid(1, 154)
    await until(lambda: len(watching.faults) == 1)
    fault = watching.faults[0]
    assert (fault.kind, fault.fatal, fault.gpu_index) == (FaultKind.RECOVERY, fatal, 1)
    assert name in fault.detail and "XID 154" in fault.detail
    assert watching.fake.calls["nvmlDeviceGetGpuRecoveryAction"] == 1


async def test_xid_154_with_an_unreadable_recovery_action_is_reported_not_guessed(watching: Running) -> None:
    watching.fake.fail("nvmlDeviceGetGpuRecoveryAction", pynvml.NVML_ERROR_NOT_SUPPORTED)
    watching.fake.emit_xid(0, 154)
    await until(lambda: len(watching.faults) == 1)
    assert (watching.faults[0].kind, watching.faults[0].fatal) == (FaultKind.RECOVERY, False)


@pytest.mark.parametrize(
    ("event", "kind"),
    [(pynvml.nvmlEventTypeGpuUnavailableError, FaultKind.UNAVAILABLE), (pynvml.nvmlEventTypeFatalPoisonError, FaultKind.POISON)],
)
async def test_gpu_unavailable_and_fatal_poison_events_are_fatal(watching: Running, event: int, kind: FaultKind) -> None:
    assert watching.fake.emit_event(0, event, 0) == 1  # registered where supported
    await until(lambda: len(watching.faults) == 1)
    assert (watching.faults[0].kind, watching.faults[0].fatal, watching.faults[0].gpu_index) == (kind, True, 0)


async def test_a_recovery_action_event_is_acted_on(watching: Running) -> None:
    watching.fake.emit_event(1, pynvml.nvmlEventTypeGpuRecoveryAction, pynvml.NVML_GPU_RECOVERY_ACTION_DRAIN_AND_RESET)
    await until(lambda: len(watching.faults) == 1)
    assert (watching.faults[0].kind, watching.faults[0].fatal) == (FaultKind.RECOVERY, True)
    assert "drain_and_reset" in watching.faults[0].detail


async def test_a_gpu_with_only_xid_events_is_still_watched() -> None:
    fake = FakeNvml(count=1)
    fake.set(0, supported_events=pynvml.nvmlEventTypeXidCriticalError)  # an older driver or GPU
    running = await start(fake)
    await until(lambda: running.watcher.state is WatchState.WATCHING)
    assert fake.emit_xid(0, 79) == 1
    await until(lambda: len(running.faults) == 1)
    assert fake.event_sets[0].registered[0] == pynvml.nvmlEventTypeXidCriticalError
    await stop(running)


async def test_non_xid_events_are_skipped(watching: Running) -> None:
    watching.fake.emit_event(0, pynvml.nvmlEventTypeDoubleBitEccError, 0)  # not registered for: not delivered
    watching.fake.emit_xid(0, 45)  # ignored, and queued after the ECC event
    await until(lambda: watching.watcher.events_total["ignored"] == 1)
    assert watching.faults == [] and sum(watching.watcher.events_total.values()) == 1


async def test_a_failing_event_wait_makes_every_gpu_suspect(watching: Running) -> None:
    watching.fake.fail_wait(pynvml.NVML_ERROR_UNKNOWN)
    await until(lambda: len(watching.faults) == 1)
    fault = watching.faults[0]
    assert (fault.kind, fault.fatal, fault.gpu_index) == (FaultKind.EVENT_WAIT, True, None)
    assert "every GPU" in fault.detail
    watching.fake.emit_xid(0, 79)  # the watcher goes on waiting after the error
    await until(lambda: len(watching.faults) == 2)


async def test_stop_is_bounded_and_releases_the_event_set_and_nvml(watching: Running) -> None:
    started = time.monotonic()
    await stop(watching)
    assert time.monotonic() - started < 1.0
    assert watching.watcher.state is WatchState.STOPPED
    assert watching.fake.refcount == 0 and watching.fake.violations == []
    assert all(event_set.freed for event_set in watching.fake.event_sets)


async def test_without_a_driver_the_watcher_says_so_and_keeps_trying() -> None:
    fake = FakeNvml.without_driver()
    running = await start(fake)
    await until(lambda: fake.calls["nvmlInit"] >= 2)
    assert running.watcher.state is WatchState.NO_DRIVER and "LIBRARY_NOT_FOUND" in running.watcher.detail
    assert not running.task.done() and running.faults == []
    await stop(running)


async def test_gpu_that_cannot_be_watched_is_reported_and_a_lost_one_is_fatal() -> None:
    fake = FakeNvml(count=3)
    fake.set(1, supported_events=0)
    fake.set(2, lost=True)
    running = await start(fake)
    await until(lambda: len(running.faults) == 2)
    assert running.watcher.state is WatchState.WATCHING and running.watcher.describe()["gpus_watched"] == 1
    by_gpu = {f.gpu_index: f for f in running.faults}
    assert (by_gpu[1].kind, by_gpu[1].fatal) == (FaultKind.WATCH, False)
    assert (by_gpu[2].kind, by_gpu[2].fatal) == (FaultKind.LOST, True)
    await stop(running)


async def test_probe_and_watcher_share_nvml_without_shutting_it_down_under_each_other() -> None:
    fake = FakeNvml(count=1)
    running = await start(fake)
    await until(lambda: running.watcher.state is WatchState.WATCHING)
    probe = GpuProbe(fake)
    await probe.sample()
    assert fake.refcount == 2
    assert await probe.close()  # NVML stays up for the watcher still waiting
    assert fake.refcount == 1 and fake.shutdowns == 0
    await stop(running)
    assert fake.refcount == 0 and fake.shutdowns == 1 and fake.violations == []


async def test_xid_failures_are_counted_as_every_source_counts_them() -> None:
    """A failing event wait and a thread that ends failed each count once in
    probe_errors_total{probe="xid"}; the watcher keeps going either way."""
    errors: Counter[str] = Counter()
    fake = FakeNvml(count=1)
    fake.fail("nvmlEventSetCreate", pynvml.NVML_ERROR_UNKNOWN, times=2)  # two threads end failed
    running = await start(fake, errors=errors)
    await until(lambda: running.watcher.state is WatchState.WATCHING)
    assert errors["xid"] == 2 and fake.calls["nvmlEventSetCreate"] == 3
    fake.fail_wait(pynvml.NVML_ERROR_UNKNOWN)
    await until(lambda: errors["xid"] == 3)
    fake.emit_xid(0, 79)  # still watching
    await until(lambda: any(f.kind is FaultKind.XID for f in running.faults))
    assert not running.task.done()
    await stop(running)


class CrashingNvml(FakeNvml):
    """An NVML binding that raises something other than NVMLError (a broken binding)."""

    def nvmlEventSetCreate(self) -> Any:
        raise RuntimeError("binding broke")


async def test_a_crashing_watcher_is_restarted_counted_and_logged_sparingly(caplog: pytest.LogCaptureFixture) -> None:
    errors: Counter[str] = Counter()
    fake = CrashingNvml(count=1)
    with caplog.at_level(logging.ERROR, logger="probes.xid"):
        running = await start(fake, errors=errors, retry_s=0.005)
        await until(lambda: errors["xid"] >= 12, timeout_s=10)
        await stop(running)
    crashes = [r for r in caplog.records if r.getMessage() == "XID watcher failed"]
    assert [r.in_a_row for r in crashes] == [1, 10]  # type: ignore[attr-defined]
    assert crashes[0].exc_info is not None and running.watcher.state in (WatchState.FAILED, WatchState.STOPPED)
    assert fake.refcount == 0  # every crashed thread still shut its NVML down
