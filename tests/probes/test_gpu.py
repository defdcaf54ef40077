"""The NVML GPU probe on FakeNvml (and the real pynvml on this machine): values,
absent values, no driver, lost GPUs, and a wedged driver that must not freeze
the loop, pile up threads or get nvmlShutdown called under it."""

from __future__ import annotations

import asyncio
import ctypes
import threading
import time
from collections import Counter
from collections.abc import Iterator

import pynvml
import pytest

from agent.core.snapshot import Snapshot
from agent.sim.nvml import FakeNvml
from probes.base import ProbeError, ProbeRunner
from probes.gpu import (
    FaultKind,
    GpuFault,
    GpuInfo,
    GpuReading,
    GpuStatus,
    gpu_faults,
    throttle_reason_names,
)
from probes.gpu_probe import GpuProbe
from probes.nvml_backend import PynvmlBackend
from probes.nvml_worker import NvmlCallTimeout, NvmlWedged, NvmlWorker
from tests.harness import until


@pytest.fixture
def fake() -> Iterator[FakeNvml]:
    nvml = FakeNvml(count=2)
    yield nvml
    nvml.release()  # let any hung worker thread finish


@pytest.fixture
async def make_probe(fake: FakeNvml):
    """GpuProbes whose worker threads are stopped after the test."""
    made: list[GpuProbe] = []

    def make(nvml=None, **kwargs) -> GpuProbe:
        made.append(GpuProbe(fake if nvml is None else nvml, **kwargs))
        return made[-1]

    yield make
    fake.release()
    for probe in made:
        await probe.close(timeout_s=0.5)


# --- pure logic -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mask", "names"),
    [
        (0, ()),
        (0x001, ("gpu_idle",)),
        (0x004 | 0x040, ("sw_power_cap", "hw_thermal_slowdown")),
        (0x400 | 0x2000, ("reliability", "0x2000")),
    ],
)
def test_throttle_reasons_are_named_and_unknown_bits_kept(mask: int, names: tuple[str, ...]) -> None:
    assert throttle_reason_names(mask) == names


def _gpu(index: int, **values) -> GpuInfo:
    base = {"uuid": f"GPU-{index}", "utilization_percent": 10.0, "memory_used_bytes": 100, "memory_total_bytes": 1000}
    return GpuInfo(index=index, **{**base, **values})


@pytest.mark.parametrize(
    ("gpus", "status", "mean", "used", "lost"),
    [
        ((), GpuStatus.NO_GPU, None, 0.0, ()),
        ((_gpu(0, utilization_percent=20.0), _gpu(1, utilization_percent=40.0)), GpuStatus.OK, 30.0, 200.0, ()),
        # a MIG GPU reports no utilization: absent from the mean, not a problem
        (
            (_gpu(0), _gpu(1, utilization_percent=None, unavailable={"utilization_percent": "NOT_SUPPORTED (MIG)"})),
            GpuStatus.OK,
            10.0,
            200.0,
            (),
        ),
        ((_gpu(0), GpuInfo(index=1, lost=True, detail="GPU_IS_LOST")), GpuStatus.DEGRADED, 10.0, 100.0, (1,)),
        (
            (_gpu(0, temperature_c=None, unavailable={"temperature_c": "UNKNOWN: Unknown Error"}),),
            GpuStatus.DEGRADED,
            10.0,
            100.0,
            (),
        ),
        ((_gpu(0, remap_failure=True),), GpuStatus.DEGRADED, 10.0, 100.0, ()),
    ],
)
def test_node_aggregates_and_status(gpus, status, mean, used, lost) -> None:
    reading = GpuReading.of(gpus)
    assert reading.status is status
    assert reading.gpu_count == len(gpus)
    assert reading.utilization_percent_mean == mean
    assert reading.memory_used_bytes_total == used
    assert reading.lost_gpus == lost
    assert (reading.detail == "") == (status is GpuStatus.OK)


@pytest.mark.parametrize(
    ("gpu", "kinds"),
    [
        (_gpu(0), []),
        (GpuInfo(index=0, uuid="GPU-0", lost=True, detail="GPU_IS_LOST"), [FaultKind.LOST]),
        (_gpu(0, remap_failure=True, remap_pending=False), [FaultKind.ROW_REMAP]),
        (_gpu(0, remap_pending=True, remapped_rows_uncorrectable=1), [FaultKind.ROW_REMAP]),
        # pending remaps from correctable errors wait for the next maintenance
        (_gpu(0, remap_pending=True, remapped_rows_correctable=3, remapped_rows_uncorrectable=0), []),
    ],
)
def test_faults_a_reading_shows_by_itself(gpu: GpuInfo, kinds: list[FaultKind]) -> None:
    faults = gpu_faults([gpu])
    assert [f.kind for f in faults] == kinds
    assert all(f.fatal and f.event_id == gpu_faults([gpu])[0].event_id for f in faults)


# --- the probe on FakeNvml ------------------------------------------------------------


async def test_reads_every_value_with_units_converted(fake: FakeNvml, make_probe) -> None:
    fake.set(
        0,
        utilization_percent=73,
        memory_used_bytes=5 * 2**30,
        temperature_c=61,
        power_mw=71_500,
        ecc_volatile_corrected=3,
        ecc_aggregate_uncorrected=1,
        remapped_rows=(2, 0, 0, 0),
        clocks_event_reasons=0x004,
    )
    probe = make_probe()
    reading = await probe.sample()
    gpu = reading.gpus[0]
    assert reading.status is GpuStatus.OK and reading.driver_version == "550.90.07"
    assert (gpu.uuid, gpu.name, gpu.utilization_percent, gpu.temperature_c, gpu.power_w) == (
        fake.gpus[0].uuid,
        "NVIDIA L4",
        73.0,
        61.0,
        71.5,
    )
    assert (gpu.memory_used_bytes, gpu.memory_total_bytes) == (5 * 2**30, fake.gpus[0].memory_total_bytes)
    assert (gpu.ecc_volatile_corrected, gpu.ecc_volatile_uncorrected, gpu.ecc_aggregate_uncorrected) == (3, 0, 1)
    assert (gpu.remapped_rows_correctable, gpu.remap_pending, gpu.remap_failure) == (2, False, False)
    assert gpu.throttle_reasons == ("sw_power_cap",) and gpu.mig_mode is False and gpu.unavailable == {}
    assert reading.gpu_count == 2 and reading.utilization_percent_mean == pytest.approx(36.5)


@pytest.mark.parametrize("code", [pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, pynvml.NVML_ERROR_DRIVER_NOT_LOADED])
async def test_no_driver_is_a_reading_and_init_is_not_retried_every_sample(code: int, make_probe) -> None:
    nvml = FakeNvml.without_driver(code)
    probe = make_probe(nvml)
    first = await probe.sample()
    second = await probe.sample()
    assert first.status is GpuStatus.NO_DRIVER and first.gpu_count == 0 and first.gpus == ()
    assert pynvml.NVMLError._errcode_to_string[code] in first.detail
    assert second is first and nvml.calls["nvmlInit"] == 1
    assert not await probe.close()  # never initialised: nothing to shut down
    assert nvml.calls["nvmlShutdown"] == 0


def _driver_loads() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return False
    return True


async def test_real_pynvml_backend_reports_what_this_machine_has(make_probe) -> None:
    reading = await make_probe(PynvmlBackend(), call_timeout_s=10).sample()
    if _driver_loads():
        assert reading.status in (GpuStatus.OK, GpuStatus.DEGRADED, GpuStatus.NO_GPU)
        assert reading.driver_version
    else:
        assert reading.status is GpuStatus.NO_DRIVER
        assert "LIBRARY_NOT_FOUND" in reading.detail


async def test_nvml_without_gpus_says_no_gpu(make_probe) -> None:
    reading = await make_probe(FakeNvml(count=0)).sample()
    assert reading.status is GpuStatus.NO_GPU and reading.gpu_count == 0


async def test_mig_utilization_is_an_absent_value_not_a_failure(fake: FakeNvml, make_probe) -> None:
    fake.set_all(mig_mode=pynvml.NVML_DEVICE_MIG_ENABLE)
    reading = await make_probe().sample()
    assert reading.status is GpuStatus.OK
    assert reading.utilization_percent_mean is None
    assert all(g.mig_mode and g.utilization_percent is None for g in reading.gpus)
    assert reading.gpus[0].unavailable == {"utilization_percent": "NOT_SUPPORTED (MIG)"}
    assert reading.gpus[0].memory_used_bytes is not None


async def test_a_gpu_without_mig_or_ecc_reports_not_supported_and_stays_ok(fake: FakeNvml, make_probe) -> None:
    fake.set_all(mig_mode=None)
    fake.fail("nvmlDeviceGetTotalEccErrors", pynvml.NVML_ERROR_NOT_SUPPORTED)
    reading = await make_probe().sample()
    assert reading.status is GpuStatus.OK
    gpu = reading.gpus[0]
    assert gpu.mig_mode is None and gpu.ecc_volatile_corrected is None
    assert gpu.unavailable == {
        "mig_mode": "NOT_SUPPORTED",
        "ecc_volatile_corrected": "NOT_SUPPORTED",
        "ecc_volatile_uncorrected": "NOT_SUPPORTED",
        "ecc_aggregate_corrected": "NOT_SUPPORTED",
        "ecc_aggregate_uncorrected": "NOT_SUPPORTED",
    }


async def test_unknown_error_on_one_value_is_reported_and_degrades(fake: FakeNvml, make_probe) -> None:
    fake.fail("nvmlDeviceGetTemperatureV", pynvml.NVML_ERROR_UNKNOWN, gpu=1)
    faults: list[GpuFault] = []
    reading = await make_probe(on_fault=faults.append).sample()
    assert reading.status is GpuStatus.DEGRADED and "gpu 1 cannot read temperature_c" in reading.detail
    assert reading.gpus[1].temperature_c is None and reading.gpus[1].power_w == 16.0
    assert reading.gpus[1].unavailable == {"temperature_c": "UNKNOWN: Unknown Error"}
    assert faults == []


@pytest.mark.parametrize("call", ["nvmlDeviceGetTemperatureV", "nvmlDeviceGetCurrentClocksEventReasons"])
async def test_a_function_this_driver_lacks_is_not_available_never_degraded(fake: FakeNvml, make_probe, call: str) -> None:
    # nvidia-ml-py 13 deprecates nvmlDeviceGetTemperature and the throttle-reason calls;
    # a CUDA 14 driver answers FUNCTION_NOT_FOUND for what it dropped.
    fake.fail(call, pynvml.NVML_ERROR_FUNCTION_NOT_FOUND)
    reading = await make_probe().sample()
    assert reading.status is GpuStatus.OK, reading.detail
    assert all(why.startswith("NOT_SUPPORTED (FUNCTION_NOT_FOUND") for gpu in reading.gpus for why in gpu.unavailable.values())
    assert all(gpu.unavailable for gpu in reading.gpus)


@pytest.mark.parametrize(
    ("code", "call"),
    [
        (pynvml.NVML_ERROR_GPU_IS_LOST, "*"),
        (pynvml.NVML_ERROR_GPU_IS_LOST, "nvmlDeviceGetPowerUsage"),  # lost in the middle of a read
        (pynvml.NVML_ERROR_RESET_REQUIRED, "*"),
        (pynvml.NVML_ERROR_LIB_RM_VERSION_MISMATCH, "*"),
    ],
)
async def test_lost_gpu_is_marked_and_the_fault_fires_once(fake: FakeNvml, make_probe, code: int, call: str) -> None:
    fake.fail(call, code, gpu=1)
    faults: list[GpuFault] = []
    probe = make_probe(on_fault=faults.append)
    reading = await probe.sample()
    await probe.sample()
    assert reading.lost_gpus == (1,) and reading.status is GpuStatus.DEGRADED
    assert reading.gpus[1].lost and not reading.gpus[0].lost
    assert reading.gpu_count == 2 and reading.memory_total_bytes_total == fake.gpus[0].memory_total_bytes
    assert len(faults) == 1
    assert (faults[0].kind, faults[0].fatal, faults[0].gpu_index) == (FaultKind.LOST, True, 1)


async def test_bad_row_remapping_present_at_start_up_is_a_fault(fake: FakeNvml, make_probe) -> None:
    fake.set(0, remapped_rows=(0, 1, 1, 0))
    faults: list[GpuFault] = []
    reading = await make_probe(on_fault=faults.append).sample()
    assert reading.status is GpuStatus.DEGRADED
    assert [(f.kind, f.gpu_index) for f in faults] == [(FaultKind.ROW_REMAP, 0)]


async def test_lost_driver_at_device_count_is_a_node_fault(fake: FakeNvml, make_probe) -> None:
    fake.fail("nvmlDeviceGetCount", pynvml.NVML_ERROR_GPU_IS_LOST)
    faults: list[GpuFault] = []
    reading = await make_probe(on_fault=faults.append).sample()
    assert reading.status is GpuStatus.DEGRADED and "GPU_IS_LOST" in reading.detail
    assert len(faults) == 1 and faults[0].gpu_index is None and faults[0].fatal


async def test_other_init_errors_are_probe_errors_with_a_code(fake: FakeNvml, make_probe) -> None:
    fake.fail("nvmlInit", pynvml.NVML_ERROR_NO_PERMISSION)
    with pytest.raises(ProbeError) as err:
        await make_probe().sample()
    assert err.value.code == "no_permission" and "Insufficient Permissions" in str(err.value)


# --- a wedged driver -------------------------------------------------------------------


async def test_hanging_call_hits_its_deadline_while_the_loop_keeps_running(fake: FakeNvml, make_probe) -> None:
    fake.hang("nvmlDeviceGetPowerUsage", gpu=0)
    probe = make_probe(call_timeout_s=0.2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    started = time.monotonic()
    with pytest.raises(NvmlCallTimeout, match="read gpu 0 timed out after 0.2s"):
        await probe.sample()
    elapsed = time.monotonic() - started
    task.cancel()
    assert 0.2 <= elapsed < 1.0
    assert ticks >= 5  # ~20 expected: the loop was never blocked by the hung call
    assert fake.hanging == 1


async def test_wedged_nvml_fails_fast_without_piling_up_threads(fake: FakeNvml, make_probe) -> None:
    fake.hang("nvmlDeviceGetUtilizationRates")
    probe = make_probe(call_timeout_s=0.5)
    with pytest.raises(NvmlCallTimeout):
        await probe.sample()
    threads_before = threading.active_count()
    for _ in range(20):
        started = time.monotonic()
        with pytest.raises(NvmlWedged, match=r"NVML wedged: 1 calls stuck \(read gpu 0\)"):
            await probe.sample()
        assert time.monotonic() - started < 0.1  # at once, not after the 0.5 s deadline
    assert threading.active_count() == threads_before
    assert fake.hanging == 1 and fake.calls["nvmlDeviceGetUtilizationRates"] == 1
    assert probe.describe()["stuck_calls"] == ["read gpu 0"]


async def test_no_nvml_shutdown_while_a_call_is_stuck(fake: FakeNvml, make_probe) -> None:
    fake.hang("nvmlDeviceGetMemoryInfo")
    probe = make_probe(call_timeout_s=0.1)
    with pytest.raises(NvmlCallTimeout):
        await probe.sample()
    started = time.monotonic()
    assert not await probe.close(timeout_s=1.0)
    assert time.monotonic() - started < 0.5  # a stuck call is not waited for
    assert fake.calls["nvmlShutdown"] == 0 and fake.violations == []


async def test_close_shuts_nvml_down_once_nothing_runs(fake: FakeNvml, make_probe) -> None:
    probe = make_probe()
    await probe.sample()
    assert await probe.close()
    assert (fake.refcount, fake.shutdowns, fake.violations) == (0, 1, [])


async def test_sampling_recovers_once_the_stuck_call_returns(fake: FakeNvml, make_probe) -> None:
    fake.hang("nvmlDeviceGetName", gpu=1)
    probe = make_probe(call_timeout_s=0.1)
    with pytest.raises(NvmlCallTimeout):
        await probe.sample()
    fake.release()
    await until(lambda: probe.describe()["stuck_calls"] == [])
    reading = await probe.sample()
    assert reading.status is GpuStatus.OK and reading.gpu_count == 2


async def test_runner_records_the_deadline_then_the_wedge_in_the_snapshot(fake: FakeNvml, make_probe) -> None:
    fake.hang("nvmlDeviceGetTemperatureV")
    snapshot, errors = Snapshot(), Counter()
    runner = ProbeRunner(make_probe(call_timeout_s=0.1), snapshot, errors)
    assert not await runner.run_once()
    assert snapshot.get("gpu").failed_with("timeout")
    assert "NVML call read gpu 0 timed out" in snapshot.get("gpu").error
    assert not await runner.run_once()
    assert snapshot.get("gpu").failed_with("wedged") and errors["gpu"] == 2


async def test_close_waits_for_a_call_in_flight_before_nvml_shutdown() -> None:
    worker = NvmlWorker()
    order: list[str] = []
    gate = threading.Event()

    def slow() -> None:
        gate.wait(2)
        order.append("call")

    call = asyncio.create_task(worker.call(slow, timeout_s=2, what="slow"))
    await until(lambda: worker.running_calls == 1, timeout_s=2)
    closing = asyncio.create_task(worker.close(lambda: order.append("shutdown"), timeout_s=2))
    for _ in range(10):
        await asyncio.sleep(0)
    assert not closing.done() and order == []
    gate.set()
    assert await closing
    await call
    assert order == ["call", "shutdown"]
