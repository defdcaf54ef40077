"""The pure half of the exporter: descriptors, snapshot -> NodeMetrics -> series,
TimeSeries protos, resource detection and the termination report. Table-driven."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import SimpleNamespace
from typing import Any

import pytest
from google.api import metric_pb2

from agent.config import ExportConfig, ExportResource
from agent.core.snapshot import Snapshot
from agent.exporter import series as s
from agent.exporter.report import TerminationReport, report_points
from agent.exporter.resource import ResourceError, detect_resource
from agent.node_view import NodeViews, VllmSource, node_view
from agent.policy.drain import DrainReport
from probes.gpu import GpuInfo, GpuReading, GpuStatus
from probes.vllm import VllmReading
from state_machine import State

SPEC_TYPES = {
    "gpu/usage_percent", "gpu/memory_used_gb", "vllm/ttft_ms", "vllm/tps", "vllm/queue_length",
    "vllm/kv_cache_usage_gb", "vllm/tpot_ms", "queue/pending_requests", "agent/state",
}
GB = 1e9


def vllm(**changes: Any) -> VllmReading:
    base = VllmReading(
        requests_running=3, requests_waiting=5, in_flight=8, kv_cache_usage_ratio=0.5, kv_cache_capacity_bytes=20 * GB,
        kv_cache_used_bytes=10 * GB, kv_capacity_source="configured", prompt_tokens_per_s=100.0, generation_tokens_per_s=250.0,
        ttft_s={"p50": 0.1, "p95": 0.4, "p99": 0.9}, tpot_s={"p50": 0.02, "p95": 0.05, "p99": 0.08}, e2e_s={},
        goodput_ratio=1.0, requests_finished_total={}, requests_completed_total=0, requests_aborted_total=0,
        window_s=60, engines=1, models=("m",), metric_names="v1", engine_sleeping=False,
    )
    return replace(base, **changes)


def gpus(*utilization: float | None) -> GpuReading:
    return GpuReading.of(
        [GpuInfo(index=i, utilization_percent=u, memory_used_bytes=int(40 * GB)) for i, u in enumerate(utilization)]
    )


class Node:
    """A snapshot with a hand-moved clock, and a lifecycle state."""

    def __init__(self, state: State = State.READY) -> None:
        self.now = 1000.0
        self.snapshot = Snapshot(clock=lambda: self.now)
        self.lifecycle = SimpleNamespace(state=state)

    def metrics(self) -> s.NodeMetrics:
        return s.node_metrics(node_view(self.snapshot, self.lifecycle.state))


def test_descriptors_cover_spec_types_with_units_descriptions_and_gauge_kind_only() -> None:
    shorts = {d.short for d in s.DESCRIPTORS}
    assert shorts >= SPEC_TYPES and all(d.type.startswith("custom.googleapis.com/") for d in s.DESCRIPTORS)
    assert {d.kind for d in s.DESCRIPTORS} <= {s.MetricKind.GAUGE, s.MetricKind.CUMULATIVE}
    assert all(d.unit and d.description for d in s.DESCRIPTORS)
    assert len(shorts) == len(s.DESCRIPTORS)
    labels = {d.short: [k for k, _ in d.labels] for d in s.DESCRIPTORS}
    assert labels["vllm/ttft_ms"] == labels["vllm/tpot_ms"] == ["quantile"]
    autoscaling = (
        "vllm/queue_length",
        "queue/pending_requests",
        "vllm/kv_cache_usage_gb",
        "vllm/tps",
        "gpu/usage_percent",
        "gpu/memory_used_gb",
    )
    assert all(labels[t] == [] for t in autoscaling)  # one series per node: autoscalers sum what matches
    units = {d.short: d.unit for d in s.DESCRIPTORS}
    assert (units["gpu/usage_percent"], units["gpu/memory_used_gb"], units["vllm/ttft_ms"]) == ("%", "GBy", "ms")


def test_fresh_readings_become_node_metrics_in_the_descriptors_units() -> None:
    node = Node()
    node.snapshot.put("vllm", vllm(), stale_after_s=5)
    node.snapshot.put("gpu", gpus(40.0, 60.0), stale_after_s=5)
    points = {(p.metric_type, p.labels): p.value for p in s.series_points(node.metrics())}
    assert points[(s.GPU_USAGE, ())] == 50.0 and points[(s.GPU_MEMORY, ())] == 80.0
    assert points[(s.VLLM_QUEUE, ())] == 5 and points[(s.PENDING, ())] == 8 and points[(s.VLLM_TPS, ())] == 250
    assert points[(s.VLLM_KV, ())] == 10.0
    assert points[(s.TTFT, (("quantile", "p95"),))] == pytest.approx(400.0) and points[
        (s.TPOT, (("quantile", "p99"),))
    ] == pytest.approx(80.0)
    assert [points[(s.AGENT_STATE, (("state", st.value),))] for st in State] == [0, 0, 1, 0, 0]
    assert len(points) == 2 + 4 + 6 + 5


def _never(node: Node) -> None:
    pass


def _refused_after_good(node: Node) -> None:
    node.snapshot.put("vllm", vllm(), stale_after_s=5)
    node.now += 1
    node.snapshot.fail("vllm", "connection refused", stale_after_s=5, code="refused")


def _hung_after_good(node: Node) -> None:
    node.snapshot.put("vllm", vllm(), stale_after_s=5)
    node.now += 1
    node.snapshot.fail("vllm", "timed out after 3s", stale_after_s=5, code="timeout")


def _old(node: Node) -> None:
    node.snapshot.put("vllm", vllm(), stale_after_s=5)
    node.now += 60


def _fresh_but_empty_window(node: Node) -> None:
    empty = dict.fromkeys(s.QUANTILES)
    node.snapshot.put(
        "vllm", vllm(generation_tokens_per_s=None, ttft_s=empty, tpot_s=empty, kv_cache_used_bytes=None), stale_after_s=5
    )


@pytest.mark.parametrize(
    "setup, source, queue, kv_gb, ttft_p95_ms, tps",
    [
        (_never, VllmSource.DOWN, 0.0, None, 0.0, 0.0),
        (_refused_after_good, VllmSource.DOWN, 0.0, 0.0, 0.0, 0.0),
        (_hung_after_good, VllmSource.HELD, 5.0, 10.0, 400.0, 250.0),
        (_old, VllmSource.HELD, 5.0, 10.0, 400.0, 250.0),
        (_fresh_but_empty_window, VllmSource.FRESH, 5.0, None, 0.0, 0.0),
    ],
)
def test_vllm_series_never_go_missing_whatever_the_reading(
    setup: Any, source: VllmSource, queue: float, kv_gb: float | None, ttft_p95_ms: float, tps: float
) -> None:
    node = Node(State.WARMING)
    setup(node)
    metrics = node.metrics()
    points = {(p.metric_type, p.labels): p.value for p in s.series_points(metrics)}
    assert metrics.vllm_source is source
    assert points[(s.VLLM_QUEUE, ())] == queue and points[(s.VLLM_TPS, ())] == tps
    assert points[(s.TTFT, (("quantile", "p95"),))] == pytest.approx(ttft_p95_ms)
    assert points.get((s.VLLM_KV, ())) == kv_gb
    assert {s.PENDING, s.TPOT, s.AGENT_STATE} <= {t for t, _ in points}


@pytest.mark.parametrize(
    "reading, stale, usage, memory_gb",
    [
        (gpus(40.0, 60.0), False, 50.0, 80.0),
        (gpus(None, None), False, None, 80.0),  # MIG: no utilization, memory still known
        (gpus(40.0), True, None, None),  # stale NVML is unknown, not zero
        (GpuReading.without_gpus(GpuStatus.NO_DRIVER, "no driver"), False, None, None),
        (None, False, None, None),
    ],
)
def test_gpu_series_come_only_from_a_fresh_reading_of_a_node_with_gpus(
    reading: GpuReading | None, stale: bool, usage: float | None, memory_gb: float | None
) -> None:
    node = Node()
    if reading is not None:
        node.snapshot.put("gpu", reading, stale_after_s=5)
    node.now += 10 if stale else 0
    points = {p.metric_type: p.value for p in s.series_points(node.metrics())}
    assert points.get(s.GPU_USAGE) == usage and points.get(s.GPU_MEMORY) == memory_gb


def test_series_are_unique_so_one_request_can_carry_a_whole_round() -> None:
    node = Node()
    node.snapshot.put("vllm", vllm(), stale_after_s=5)
    node.snapshot.put("gpu", gpus(*[50.0] * 8), stale_after_s=5)
    points = s.series_points(node.metrics())
    assert len({(p.metric_type, p.labels) for p in points}) == len(points) <= s.MAX_SERIES_PER_REQUEST


def test_time_series_protos_carry_kind_value_type_resource_and_end_time_only() -> None:
    points = [
        s.SeriesPoint(s.AGENT_STATE, (("state", "READY"),), s.MetricKind.GAUGE, 1.0),
        s.SeriesPoint(s.VLLM_QUEUE, (), s.MetricKind.GAUGE, 2.5),
    ]
    state, queue = s.time_series_protos(points, "generic_node", {"project_id": "p", "node_id": "n"}, 1_800_000_000.25)
    assert state.points[0].value.WhichOneof("value") == "int64_value" and state.points[0].value.int64_value == 1
    assert queue.points[0].value.double_value == 2.5 and queue.value_type == metric_pb2.MetricDescriptor.DOUBLE
    assert queue.metric_kind == metric_pb2.MetricDescriptor.GAUGE and not queue.points[0].interval.HasField("start_time")
    end = queue.points[0].interval.end_time
    assert (end.seconds, end.nanos) == (1_800_000_000, 250_000_000)
    assert dict(state.metric.labels) == {"state": "READY"} and dict(queue.resource.labels) == {"project_id": "p", "node_id": "n"}


def test_cumulative_points_need_a_start_before_the_end_and_requests_hold_200_series() -> None:
    cumulative = [s.SeriesPoint(s.VLLM_QUEUE, (), s.MetricKind.CUMULATIVE, 1.0)]
    (ts,) = s.time_series_protos(cumulative, "global", {"project_id": "p"}, 200.0, start_wall=100.0)
    assert ts.points[0].interval.start_time.seconds == 100
    with pytest.raises(ValueError, match="start time before its end"):
        s.time_series_protos(cumulative, "global", {"project_id": "p"}, 200.0, start_wall=200.0)
    with pytest.raises(ValueError, match="at most 200"):
        s.create_request("p", [ts] * 201)


def test_descriptor_proto_names_the_project_and_declares_units_and_labels() -> None:
    proto = s.descriptor_proto(s.DESCRIPTOR_BY_TYPE[s.TTFT], "p")
    assert proto.name == f"projects/p/metricDescriptors/{s.TTFT}" and proto.unit == "ms"
    assert [label.key for label in proto.labels] == ["quantile"] and proto.value_type == metric_pb2.MetricDescriptor.DOUBLE


@dataclass(frozen=True)
class Identity:
    project_id: str | None = "proj"
    instance_id: str | None = "1234567890"
    zone: str | None = "projects/987/zones/us-central1-a"
    cluster_name: str | None = None
    cluster_location: str | None = None


GKE = Identity(cluster_name="serving", cluster_location="us-central1")
POD_ENV = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "POD_NAME": "vllm-7d9f", "POD_NAMESPACE": "llm"}


@pytest.mark.parametrize(
    "cfg, identity, environ, kind, labels",
    [
        ({}, Identity(), {}, "gce_instance", {"project_id": "proj", "instance_id": "1234567890", "zone": "us-central1-a"}),
        (
            {},
            GKE,
            POD_ENV,
            "k8s_pod",
            {
                "project_id": "proj",
                "location": "us-central1",
                "cluster_name": "serving",
                "namespace_name": "llm",
                "pod_name": "vllm-7d9f",
            },
        ),
        (
            {"project_id": "mine"},
            None,
            {},
            "generic_node",
            {"project_id": "mine", "location": "global", "namespace": "default", "node_id": "host-a"},
        ),
        (
            {},
            GKE,
            {},
            "gce_instance",
            {"project_id": "proj", "instance_id": "1234567890", "zone": "us-central1-a"},
        ),  # GKE node, not in a pod
        (
            {"resource": "generic_node"},
            GKE,
            POD_ENV,
            "generic_node",
            {"project_id": "proj", "location": "us-central1-a", "namespace": "serving", "node_id": "1234567890"},
        ),
        (
            {"resource": "gce_instance", "project_id": "p2", "node_id": "55", "location": "europe-west4-a"},
            None,
            {},
            "gce_instance",
            {"project_id": "p2", "instance_id": "55", "zone": "europe-west4-a"},
        ),
        (
            {"project_id": "other", "location": "eu", "node_id": "n1"},
            None,
            {},
            "generic_node",
            {"project_id": "other", "location": "eu", "namespace": "default", "node_id": "n1"},
        ),
    ],
)
def test_resource_is_detected_from_identity_and_env_and_overridable(
    cfg: dict[str, Any], identity: Identity | None, environ: dict[str, str], kind: str, labels: dict[str, str]
) -> None:
    resource = detect_resource(ExportConfig(**cfg), identity, environ, "host-a")
    assert resource.as_dict() == {"type": kind, "labels": labels}


@pytest.mark.parametrize(
    "cfg, identity, environ, message",
    [
        ({}, None, {}, "export.project_id is not set"),
        ({"resource": "k8s_pod"}, GKE, {"POD_NAME": "p"}, "POD_NAMESPACE"),
        ({"resource": "k8s_pod", "project_id": "p"}, None, POD_ENV, "cluster name"),
        ({"resource": "gce_instance", "project_id": "p"}, None, {}, "set export.node_id and export.location"),
    ],
)
def test_resource_errors_say_what_is_missing_and_where_it_comes_from(
    cfg: dict[str, Any], identity: Identity | None, environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ResourceError, match=message):
        detect_resource(ExportConfig(**cfg), identity, environ, "host-a")
    assert ExportConfig(**cfg).resource in set(ExportResource)


def test_termination_report_comes_from_the_drain_and_becomes_labelled_points() -> None:
    drain = DrainReport(
        reason="preemption",
        detail="TRUE",
        started_at_wall=100.0,
        finished_at_wall=118.5,
        drain_s=18.5,
        in_flight_at_notice=12.0,
        completed=10.0,
        aborted=2.0,
        outcome="deadline",
        failed=1.0,
    )
    report = TerminationReport.from_drain(drain, transitions=6)
    assert report.as_dict()["at"] == "1970-01-01T00:01:58Z" and report.transitions == 6
    points = {p.metric_type.removeprefix(s.TERMINATION): p for p in report_points(report)}
    assert {name: p.value for name, p in points.items()} == {
        "count": 1,
        "drain_seconds": 18.5,
        "in_flight_at_notice": 12,
        "completed_requests": 10,
        "aborted_requests": 2,
        "failed_requests": 1,
    }
    assert all(p.labels == (("reason", "preemption"), ("outcome", "deadline")) for p in points.values())
    assert all(p.metric_type in s.DESCRIPTOR_BY_TYPE for p in points.values())
    unknown = report_points(replace(report, in_flight_at_notice=None))
    assert s.TERMINATION + "in_flight_at_notice" not in {p.metric_type for p in unknown}
    assert not any(math.isnan(p.value) for p in unknown)


def test_autoscaling_series_follow_the_lifecycle_rule_and_the_facts_do_not() -> None:
    from agent.demand import DemandGauge, DemandTargets

    gauge = DemandGauge(DemandTargets(queue_per_node=10.0, kv_usage_ratio=0.5))  # hand targets: a fixed formula here
    node = Node()

    views = NodeViews(node.snapshot, node.lifecycle, gauge)

    def written(state: State) -> dict[tuple[str, tuple], float]:
        node.lifecycle.state = state
        return {(p.metric_type, p.labels): p.value for p in s.series_points(s.node_metrics(views.round()))}

    p95 = (s.TTFT, (("quantile", "p95"),))
    node.snapshot.put("vllm", vllm(), stale_after_s=5)
    node.snapshot.put("gpu", gpus(90.0, 70.0), stale_after_s=5)
    warming = written(State.WARMING)
    assert (
        warming[(s.VLLM_QUEUE, ())],
        warming[(s.PENDING, ())],
        warming[p95],
        warming[(s.GPU_USAGE, ())],
        warming[(s.NODE_DEMAND, ())],
    ) == (0, 0, 0, 0, 0)
    assert warming[(s.VLLM_TPS, ())] == 250  # tps is a fact, not an autoscaling series
    ready = written(State.READY)
    assert (ready[(s.VLLM_QUEUE, ())], ready[(s.PENDING, ())], ready[(s.GPU_USAGE, ())]) == (5, 8, 80.0)
    assert ready[p95] == pytest.approx(400.0) and ready[(s.NODE_DEMAND, ())] == pytest.approx(1.0)  # kv 0.5 / 0.5
    # Draining: the LB sends nothing new, the node empties; the autoscaling series hold.
    node.snapshot.put(
        "vllm",
        vllm(requests_waiting=0, requests_running=1, in_flight=1, ttft_s={"p50": 0.01, "p95": 0.02, "p99": 0.03}),
        stale_after_s=5,
    )
    node.snapshot.put("gpu", gpus(3.0, 1.0), stale_after_s=5)
    draining = written(State.DRAINING)
    for series in [(s.VLLM_QUEUE, ()), (s.PENDING, ()), (s.GPU_USAGE, ()), (s.NODE_DEMAND, ())] + [
        (s.TTFT, (("quantile", q),)) for q in s.QUANTILES
    ]:
        assert draining[series] == pytest.approx(ready[series]), series
    assert draining[(s.GPU_MEMORY, ())] == 80.0  # memory stays a fact
