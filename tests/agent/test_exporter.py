"""The exporter against FakeMetricService on loopback: the real google-cloud-monitoring
client over a plaintext channel; assertions on what the fake accepted and refused."""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.config import ExportConfig
from agent.core.snapshot import Snapshot
from agent.exporter import series as s
from agent.exporter.push_loop import Exporter, Tuning
from agent.exporter.report import TerminationReport
from agent.node_view import NodeViews
from agent.sim.monitoring import FakeMetricService
from probes.metadata import IDENTITY_KEY
from probes.vllm import VllmReading
from state_machine import DrainReason, Lifecycle, Source
from tests.harness import until

PROJECT = "fleet-project"
T0 = 1_800_000_000.0
FAST = Tuning(request_timeout_s=1.0, retry_base_s=0.01, retry_cap_s=0.02, replay_interval_s=0.0, identity_wait_s=0.0)
SERIES_PER_ROUND = 15  # no GPU reading: queue, pending, tps, kv (capacity known), 6 latency, 5 state


@dataclass(frozen=True)
class Identity:
    project_id: str | None = PROJECT
    instance_id: str | None = "7001"
    zone: str | None = "projects/12/zones/us-east1-b"
    cluster_name: str | None = None
    cluster_location: str | None = None


class Wall:
    """The wall clock of the node and of the fake API, moved by hand."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def reading(waiting: float = 4) -> VllmReading:
    quantiles = {"p50": 0.1, "p95": 0.2, "p99": 0.3}
    return VllmReading(
        requests_running=2,
        requests_waiting=waiting,
        in_flight=2 + waiting,
        kv_cache_usage_ratio=0.25,
        kv_cache_capacity_bytes=8e9,
        kv_cache_used_bytes=2e9,
        kv_capacity_source="configured",
        prompt_tokens_per_s=10.0,
        generation_tokens_per_s=90.0,
        ttft_s=quantiles,
        tpot_s=quantiles,
        e2e_s={},
        goodput_ratio=1.0,
        requests_finished_total={},
        requests_completed_total=0,
        requests_aborted_total=0,
        window_s=60,
        engines=1,
        models=("m",),
        metric_names="v1",
        engine_sleeping=False,
    )


@dataclass
class Node:
    wall: Wall
    fake: FakeMetricService
    snapshot: Snapshot
    lifecycle: Lifecycle
    exporters: list[Exporter]

    def exporter(self, environ: dict[str, str] | None = None, tuning: Tuning = FAST, **cfg: Any) -> Exporter:
        settings = {"project_id": PROJECT, "insecure": True, "endpoint": self.fake.endpoint, "interval_s": 10, **cfg}
        exporter = Exporter(
            ExportConfig(**settings),
            NodeViews(self.snapshot, self.lifecycle, None),
            wall=self.wall,
            environ=environ or {},
            hostname="node-a",
            tuning=tuning,
        )
        self.exporters.append(exporter)
        return exporter

    async def push(self, exporter: Exporter, after_s: float = 10.0) -> None:
        self.wall.now += after_s
        await exporter.push_once()


@pytest.fixture
async def node() -> AsyncIterator[Node]:
    wall = Wall()
    fake = await FakeMetricService(wall=wall).start()
    lifecycle = Lifecycle(wall=wall)
    lifecycle.start_warming()
    lifecycle.mark_ready("healthy")
    snapshot = Snapshot()
    snapshot.put("vllm", reading(), stale_after_s=1e6)
    it = Node(wall, fake, snapshot, lifecycle, [])
    yield it
    for exporter in it.exporters:
        await exporter.close()
    await fake.stop()


def queue_ends(fake: FakeMetricService) -> list[float]:
    return [p.end_wall for p in fake.series(s.VLLM_QUEUE)]


GKE_ENV = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_NAME": "vllm-0", "POD_NAMESPACE": "serving"}


@pytest.mark.parametrize(
    "identity, environ, cfg, resource_type, resource_labels",
    [
        (Identity(), {}, {}, "gce_instance", {"project_id": PROJECT, "instance_id": "7001", "zone": "us-east1-b"}),
        (
            Identity(cluster_name="gpu", cluster_location="us-east1"),
            GKE_ENV,
            {},
            "k8s_pod",
            {
                "project_id": PROJECT,
                "location": "us-east1",
                "cluster_name": "gpu",
                "namespace_name": "serving",
                "pod_name": "vllm-0",
            },
        ),
        (
            None,
            {},
            {"resource": "generic_node", "location": "lab"},
            "generic_node",
            {"project_id": PROJECT, "location": "lab", "namespace": "default", "node_id": "node-a"},
        ),
    ],
)
async def test_a_round_creates_every_descriptor_then_writes_one_request_on_the_node_resource(
    node: Node,
    identity: Identity | None,
    environ: dict[str, str],
    cfg: dict[str, Any],
    resource_type: str,
    resource_labels: dict[str, str],
) -> None:
    if identity is not None:
        node.snapshot.put(IDENTITY_KEY, identity, stale_after_s=1e6)
    exporter = node.exporter(environ, **cfg)
    await exporter.push_once()
    units = {d.type.removeprefix(s.PREFIX): d.unit for d in node.fake.descriptors.values()}
    assert units == {d.short: d.unit for d in s.DESCRIPTORS}
    (write,) = node.fake.calls_of("CreateTimeSeries")
    assert (write.code, write.series) == ("OK", SERIES_PER_ROUND)
    assert {(p.resource_type, tuple(sorted(p.resource_labels.items()))) for p in node.fake.points} == {
        (resource_type, tuple(sorted(resource_labels.items())))
    }
    assert [p.value for p in node.fake.series(s.VLLM_QUEUE)] == [4.0] and node.fake.series(s.VLLM_QUEUE)[0].metric_labels == {}
    assert [p.value for p in node.fake.series(s.AGENT_STATE, state="READY")] == [1]
    assert [p.value for p in node.fake.series(s.TTFT, quantile="p95")] == [pytest.approx(200.0)]
    health = exporter.health()
    assert (health["points_written"], health["descriptors_created"], health["backlog_size"]) == (
        SERIES_PER_ROUND,
        len(s.DESCRIPTORS),
        0,
    )
    assert (
        health["healthy"] and health["last_success_at"] == "2027-01-15T08:00:00Z" and health["resource"]["type"] == resource_type
    )


async def test_descriptors_are_created_once_and_one_that_already_exists_is_fine(node: Node) -> None:
    node.fake.inject("CreateMetricDescriptor", grpc.StatusCode.ALREADY_EXISTS)
    exporter = node.exporter()
    await node.push(exporter)
    await node.push(exporter)
    assert len(node.fake.calls_of("CreateMetricDescriptor")) == len(s.DESCRIPTORS)
    assert [c.code for c in node.fake.calls_of("CreateTimeSeries")] == ["OK", "OK"]


async def test_pushes_keep_one_point_per_series_5_s_apart_and_skip_a_sample_that_would_not(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = node.exporter()
    for after_s in (10, 10, 2, 10):
        await node.push(exporter, after_s)
    assert queue_ends(node.fake) == [T0 + 10, T0 + 20, T0 + 32]
    assert all(c.code == "OK" for c in node.fake.calls) and "export sample skipped" in caplog.text


async def test_an_outage_then_recovery_writes_every_point_once_and_in_order(node: Node) -> None:
    exporter = node.exporter()
    await node.push(exporter)
    node.fake.unavailable = True
    for _ in range(5):
        await node.push(exporter)
    health = exporter.health()
    assert (
        health["backlog_size"] == 5 * SERIES_PER_ROUND
        and health["failures_by_code"]["UNAVAILABLE"] >= 5
        and not health["healthy"]
    )
    node.fake.unavailable = False
    await node.push(exporter)
    assert queue_ends(node.fake) == [T0 + 10 * i for i in range(1, 8)]
    assert len(node.fake.points) == 7 * SERIES_PER_ROUND == exporter.points_total["ok"]
    assert (exporter.health()["backlog_size"], exporter.points_total["dropped"]) == (0, 0)


async def test_an_outage_longer_than_the_backlog_drops_the_oldest_and_counts_every_one(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    exporter = node.exporter(backlog_max_points=3 * SERIES_PER_ROUND)
    node.fake.unavailable = True
    for _ in range(6):
        await node.push(exporter)
    node.fake.unavailable = False
    await node.push(exporter)
    assert queue_ends(node.fake) == [T0 + 40, T0 + 50, T0 + 60, T0 + 70]  # the newest survive, in order
    assert exporter.points_total["dropped"] == 3 * SERIES_PER_ROUND
    assert exporter.points_total["ok"] + exporter.points_total["dropped"] == 7 * SERIES_PER_ROUND
    assert "export backlog full" in caplog.text


async def test_a_replayed_backlog_is_paced_one_request_per_replay_interval(node: Node) -> None:
    exporter = node.exporter(tuning=Tuning(replay_interval_s=0.05, retry_base_s=0.01, retry_cap_s=0.02, identity_wait_s=0))
    node.fake.unavailable = True
    for _ in range(3):
        await node.push(exporter)
    node.fake.unavailable = False
    await node.push(exporter)
    arrivals = [c.received_mono for c in node.fake.calls_of("CreateTimeSeries") if c.code == "OK"]
    assert len(arrivals) == 4 and queue_ends(node.fake) == [T0 + 10, T0 + 20, T0 + 30, T0 + 40]
    assert all(later - earlier >= 0.05 for earlier, later in itertools.pairwise(arrivals))


async def test_a_refused_write_fails_its_batch_and_the_rest_of_the_backlog_waits(node: Node) -> None:
    exporter = node.exporter()
    node.fake.unavailable = True
    await node.push(exporter)
    node.fake.unavailable = False
    node.fake.inject("CreateTimeSeries", grpc.StatusCode.PERMISSION_DENIED)
    await node.push(exporter)
    assert exporter.points_total["failed"] == SERIES_PER_ROUND and exporter.health()["backlog_size"] == SERIES_PER_ROUND
    await node.push(exporter)
    assert queue_ends(node.fake) == [T0 + 20, T0 + 30]


async def test_run_waits_for_the_metadata_identity_before_its_first_push(node: Node) -> None:
    exporter = node.exporter(tuning=Tuning(identity_wait_s=5, retry_base_s=0.01, retry_cap_s=0.02))
    async with asyncio.TaskGroup() as group:
        task = group.create_task(exporter.run())
        await asyncio.sleep(0.05)
        assert node.fake.calls == []
        node.snapshot.put(IDENTITY_KEY, Identity(), stale_after_s=1e6)
        await until(lambda: exporter.points_total["ok"] == SERIES_PER_ROUND, 5, what="the first push")
        task.cancel()
    assert {p.resource_type for p in node.fake.points} == {"gce_instance"}


async def test_without_a_project_id_the_error_says_which_setting_is_missing(node: Node) -> None:
    exporter = node.exporter(project_id=None)
    await node.push(exporter)
    assert (
        exporter.health()["last_error_code"] == "resource" and "export.project_id is not set" in exporter.health()["last_error"]
    )
    assert node.fake.calls == []


async def test_a_round_too_big_for_one_request_is_split_and_a_failed_chunk_resumes_where_it_stopped(node: Node) -> None:
    exporter = node.exporter(tuning=Tuning(max_series_per_request=4, max_attempts=1, replay_interval_s=0, identity_wait_s=0))
    await node.push(exporter)
    assert [c.series for c in node.fake.calls_of("CreateTimeSeries")] == [4, 4, 4, 3]
    node.fake.calls.clear()
    node.fake.faults.clear()
    node.fake.inject("CreateTimeSeries", grpc.StatusCode.OK)  # the 1st chunk passes...
    node.fake.inject("CreateTimeSeries", grpc.StatusCode.UNAVAILABLE)  # ...the 2nd does not
    await node.push(exporter)
    assert [(c.code, c.series) for c in node.fake.calls_of("CreateTimeSeries")] == [("OK", 4), ("UNAVAILABLE", 4)]
    assert exporter.health()["backlog_size"] == SERIES_PER_ROUND - 4
    await node.push(exporter)
    assert len(node.fake.points) == 3 * SERIES_PER_ROUND and queue_ends(node.fake) == [T0 + 10, T0 + 20, T0 + 30]


async def test_unavailable_is_retried_with_backoff_and_written_once(node: Node) -> None:
    node.fake.inject("CreateTimeSeries", grpc.StatusCode.UNAVAILABLE, times=2)
    exporter = node.exporter()
    await node.push(exporter)
    assert [c.code for c in node.fake.calls_of("CreateTimeSeries")] == ["UNAVAILABLE", "UNAVAILABLE", "OK"]
    assert exporter.points_total["retried"] == 2 * SERIES_PER_ROUND and len(node.fake.points) == SERIES_PER_ROUND


async def test_a_deadline_exceeded_write_that_landed_is_not_duplicated_by_its_retry(node: Node) -> None:
    node.fake.inject("CreateTimeSeries", grpc.StatusCode.DEADLINE_EXCEEDED, after_write=True)
    exporter = node.exporter()
    await node.push(exporter)
    assert [c.code for c in node.fake.calls_of("CreateTimeSeries")] == ["DEADLINE_EXCEEDED", "INVALID_ARGUMENT"]
    assert len(node.fake.points) == SERIES_PER_ROUND and exporter.health()["failures_by_code"] == {
        "DEADLINE_EXCEEDED": 1,
        "INVALID_ARGUMENT": 1,
    }
    await node.push(exporter)
    assert queue_ends(node.fake) == [T0 + 10, T0 + 20]


async def test_a_partial_failure_is_counted_and_logged_not_retried(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    node.fake.inject(
        "CreateTimeSeries", grpc.StatusCode.INVALID_ARGUMENT, reject_series=2, message="Field timeSeries[0] had an invalid value"
    )
    exporter = node.exporter()
    await node.push(exporter)
    assert [c.code for c in node.fake.calls_of("CreateTimeSeries")] == ["INVALID_ARGUMENT"]
    assert (exporter.points_total["ok"], exporter.points_total["failed"]) == (SERIES_PER_ROUND - 2, 2)
    assert len(node.fake.points) == SERIES_PER_ROUND - 2 and exporter.health()["backlog_size"] == 0
    assert any(
        r.levelno == logging.ERROR and "One or more TimeSeries could not be written" in r.getMessage() for r in caplog.records
    )


@pytest.mark.parametrize(
    "code, hint",
    [
        (grpc.StatusCode.PERMISSION_DENIED, "roles/monitoring.metricWriter"),
        (grpc.StatusCode.NOT_FOUND, "check export.project_id"),
    ],
)
async def test_a_refused_project_is_a_clear_error_in_status_and_logs_and_the_exporter_keeps_running(
    node: Node, caplog: pytest.LogCaptureFixture, code: grpc.StatusCode, hint: str
) -> None:
    node.fake.deny(PROJECT, code)
    exporter = node.exporter()
    async with asyncio.TaskGroup() as group:
        task = group.create_task(exporter.run())
        await until(lambda: exporter.health()["last_error_code"] == code.name, 5, what="the refusal in health")
        health = exporter.health()
        assert hint in health["last_error"] and PROJECT in health["last_error"] and not task.done()
        assert len(node.fake.calls) == 1  # not retried
        task.cancel()
    assert task.cancelled()
    assert any(r.levelno == logging.ERROR and code.name in r.getMessage() for r in caplog.records)


async def test_missing_credentials_are_a_clear_error_in_health_not_a_crash(
    node: Node, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    exporter = node.exporter(insecure=False, endpoint="127.0.0.1:9")
    await node.push(exporter)
    health = exporter.health()
    assert health["last_error_code"] == "credentials" and "no Google credentials" in health["last_error"]
    assert health["failures_by_code"] == {"credentials": 1} and health["backlog_size"] == SERIES_PER_ROUND


def terminate(lifecycle: Lifecycle) -> None:
    lifecycle.begin_drain(DrainReason.PREEMPTION, Source.METADATA, deadline_s=25)
    lifecycle.terminate("emptied")


REPORT = TerminationReport(
    reason="preemption",
    outcome="emptied",
    at_wall=T0 + 15,
    drain_s=9.5,
    in_flight_at_notice=6,
    completed=6,
    aborted=0,
    transitions=5,
)


async def test_flush_final_writes_the_report_and_the_last_points_within_the_deadline(node: Node) -> None:
    exporter = node.exporter()
    await node.push(exporter)
    terminate(node.lifecycle)
    node.wall.now += 10
    assert await exporter.flush_final(REPORT, deadline_s=2.0)
    report = {
        p.metric_type.removeprefix(s.TERMINATION): (p.value, p.end_wall)
        for p in node.fake.points
        if p.metric_type.startswith(s.TERMINATION)
    }
    assert report == {
        "count": (1, T0 + 15),
        "drain_seconds": (9.5, T0 + 15),
        "in_flight_at_notice": (6, T0 + 15),
        "completed_requests": (6, T0 + 15),
        "aborted_requests": (0, T0 + 15),
        "failed_requests": (0, T0 + 15),
    }
    assert node.fake.series(s.TERMINATION + "count")[0].metric_labels == {"reason": "preemption", "outcome": "emptied"}
    assert [p.value for p in node.fake.series(s.AGENT_STATE, state="TERMINATED")] == [0, 1]
    assert all(c.code == "OK" for c in node.fake.calls)
    calls = len(node.fake.calls)
    node.wall.now += 30
    assert await exporter.flush_final(REPORT, deadline_s=2.0)  # the stop signal after TERMINATED: once only
    assert len(node.fake.calls) == calls


async def test_flush_final_right_after_a_push_skips_the_last_sample_rather_than_break_the_5_s_rule(node: Node) -> None:
    exporter = node.exporter()
    await node.push(exporter)
    node.wall.now += 2
    assert await exporter.flush_final(REPORT, deadline_s=2.0)
    assert queue_ends(node.fake) == [T0 + 10] and all(c.code == "OK" for c in node.fake.calls)
    assert len(node.fake.series(s.TERMINATION + "count")) == 1


async def test_flush_final_during_an_outage_gives_up_within_the_deadline_and_counts_what_is_left(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    exporter = node.exporter()
    await node.push(exporter)
    node.fake.unavailable = True
    node.wall.now += 10
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert not await exporter.flush_final(REPORT, deadline_s=0.3)
    assert loop.time() - started < 1.0
    assert exporter.points_total["dropped"] == 6 + SERIES_PER_ROUND  # the report (6 points) and the last round
    assert any(r.getMessage() == "termination report" for r in caplog.records)


async def test_a_hanging_api_never_blocks_the_event_loop(node: Node) -> None:
    node.fake.inject("CreateTimeSeries", grpc.StatusCode.OK, delay_s=5.0, times=10)
    exporter = node.exporter(
        tuning=Tuning(request_timeout_s=0.2, max_attempts=2, retry_base_s=0.01, retry_cap_s=0.02, identity_wait_s=0)
    )
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    async with asyncio.TaskGroup() as group:
        ticker = group.create_task(tick())
        await node.push(exporter)
        ticker.cancel()
    assert ticks >= 10  # the loop kept running through two 0.2 s timeouts
    health = exporter.health()
    assert health["failures_by_code"]["DEADLINE_EXCEEDED"] == 2 and health["backlog_size"] == SERIES_PER_ROUND


async def test_run_pushes_at_once_then_returns_once_flush_final_takes_over(node: Node) -> None:
    exporter = node.exporter()
    async with asyncio.TaskGroup() as group:
        task = group.create_task(exporter.run())
        await until(lambda: exporter.points_total["ok"] == SERIES_PER_ROUND, 5, what="the first push")
        node.wall.now += 10
        assert await exporter.flush_final(REPORT, deadline_s=2.0)
        written = len(node.fake.calls)
        await asyncio.wait_for(task, 2)  # done (the supervisor runs it as a task that may finish)
    assert not task.cancelled() and task.result() is None
    assert len(node.fake.calls) == written  # nothing pushed after the final flush



async def test_metrics_families_expose_points_by_result_and_the_backlog(node: Node) -> None:
    exporter = node.exporter()
    await node.push(exporter)
    registry = CollectorRegistry()
    registry.register(exporter)  # a Collector: collect() builds the families at scrape time
    text = generate_latest(registry).decode()
    assert f'gpu_node_agent_export_points_total{{result="ok"}} {float(SERIES_PER_ROUND)}' in text
    assert 'gpu_node_agent_export_points_total{result="dropped"} 0.0' in text
    assert "gpu_node_agent_export_backlog_points 0.0" in text and 'gpu_node_agent_export_requests_total{code="OK"}' in text
