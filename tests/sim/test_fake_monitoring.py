"""FakeMetricService enforces Cloud Monitoring's custom-metric rules and injects its
faults, as seen by the real google-cloud-monitoring async client over plaintext gRPC."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest
from google.api import metric_pb2
from google.api_core import exceptions as gexc
from google.cloud import monitoring_v3

from agent.config import ExportConfig
from agent.exporter.api_client import build_client, partial_summary
from agent.exporter.series import (
    AGENT_STATE,
    DESCRIPTOR_BY_TYPE,
    DESCRIPTORS,
    PENDING,
    VLLM_QUEUE,
    MetricKind,
    SeriesPoint,
    create_request,
    descriptor_proto,
    time_series_protos,
)
from agent.sim.monitoring import FakeMetricService

PROJECT = "demo-project"
T0 = 1_800_000_000.0
VM = {"project_id": PROJECT, "instance_id": "4242", "zone": "us-central1-a"}


class Wall:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall() -> Wall:
    return Wall()


@pytest.fixture
async def fake(wall: Wall) -> AsyncIterator[FakeMetricService]:
    service = await FakeMetricService(wall=wall).start()
    yield service
    await service.stop()


@pytest.fixture
async def client(fake: FakeMetricService) -> AsyncIterator[Any]:
    api = await build_client(ExportConfig(insecure=True, endpoint=fake.endpoint, project_id=PROJECT))
    yield api
    await api.transport.close()


async def create_descriptors(client: Any, project: str = PROJECT) -> None:
    for desc in DESCRIPTORS:
        await client.create_metric_descriptor(name=f"projects/{project}", metric_descriptor=descriptor_proto(desc, project))


def series(end: float, *metric_types: str, value: float = 1.0, resource: dict[str, str] | None = None) -> list[Any]:
    points = [SeriesPoint(t, (), MetricKind.GAUGE, value) for t in metric_types or (VLLM_QUEUE,)]
    return time_series_protos(points, "gce_instance", resource or VM, end)


async def write(client: Any, items: list[Any], project: str = PROJECT) -> None:
    await client.create_time_series(request=create_request(project, items), timeout=5)


async def test_descriptors_are_created_listed_and_creating_one_again_is_harmless(fake: FakeMetricService, client: Any) -> None:
    await create_descriptors(client)
    await create_descriptors(client)
    got = await client.get_metric_descriptor(name=f"projects/{PROJECT}/metricDescriptors/{VLLM_QUEUE}")
    assert got.unit == "{request}" and got.metric_kind == metric_pb2.MetricDescriptor.GAUGE
    listed = [d.type async for d in await client.list_metric_descriptors(name=f"projects/{PROJECT}")]
    assert sorted(listed) == sorted(d.type for d in DESCRIPTORS)
    with pytest.raises(gexc.NotFound):
        await client.get_metric_descriptor(name=f"projects/{PROJECT}/metricDescriptors/custom.googleapis.com/nope")


async def test_accepted_points_are_recorded_with_their_resource_labels_and_kind(fake: FakeMetricService, client: Any) -> None:
    await create_descriptors(client)
    points = [
        SeriesPoint(AGENT_STATE, (("state", "READY"),), MetricKind.GAUGE, 1),
        SeriesPoint(VLLM_QUEUE, (), MetricKind.GAUGE, 7.5),
    ]
    await write(client, time_series_protos(points, "gce_instance", VM, T0))
    state, queue = fake.points
    assert (state.metric_labels, state.value, state.kind, state.end_wall) == ({"state": "READY"}, 1, "GAUGE", T0)
    assert (queue.resource_type, queue.resource_labels, queue.value) == ("gce_instance", VM, 7.5)


async def test_a_second_point_within_10_s_is_a_partial_failure_carrying_a_summary(fake: FakeMetricService, client: Any) -> None:
    await create_descriptors(client)
    await write(client, series(T0, VLLM_QUEUE))
    with pytest.raises(gexc.InvalidArgument) as caught:
        await write(client, series(T0 + 9.9, VLLM_QUEUE) + series(T0 + 9.9, PENDING))
    summary = partial_summary(caught.value)
    assert (summary.total_point_count, summary.success_point_count) == (2, 1)
    assert "more frequently than the maximum sampling period" in caught.value.message and "timeSeries[0]" in caught.value.message
    assert [p.metric_type for p in fake.points] == [VLLM_QUEUE, PENDING]
    await write(client, series(T0 + 10.0, VLLM_QUEUE))  # 10 s later is fine (the quota)
    assert len(fake.series(VLLM_QUEUE)) == 2


async def test_out_of_order_and_duplicate_series_are_refused(fake: FakeMetricService, client: Any) -> None:
    await create_descriptors(client)
    await write(client, series(T0 + 60, VLLM_QUEUE))
    with pytest.raises(gexc.InvalidArgument, match="Points must be written in order"):
        await write(client, series(T0, VLLM_QUEUE))
    with pytest.raises(gexc.InvalidArgument, match="Duplicate TimeSeries") as caught:
        await write(client, series(T0 + 120, VLLM_QUEUE) + series(T0 + 120, VLLM_QUEUE))
    assert partial_summary(caught.value).success_point_count == 1


async def test_more_than_200_series_are_refused_whole(fake: FakeMetricService, client: Any) -> None:
    await create_descriptors(client)
    many = [ts for i in range(201) for ts in series(T0, resource={**VM, "instance_id": str(i)})]
    raw = monitoring_v3.CreateTimeSeriesRequest.pb()(name=f"projects/{PROJECT}", time_series=many)
    with pytest.raises(gexc.InvalidArgument, match="1 to 200 TimeSeries"):
        await client.create_time_series(request=monitoring_v3.CreateTimeSeriesRequest(raw), timeout=5)
    assert fake.points == [] and fake.calls[-1].series == 201


async def test_points_of_an_unknown_descriptor_are_refused_unless_auto_created(wall: Wall) -> None:
    for auto, stored in ((False, 0), (True, 1)):
        fake = await FakeMetricService(wall=wall, auto_create_descriptors=auto).start()
        api = await build_client(ExportConfig(insecure=True, endpoint=fake.endpoint))
        try:
            if auto:
                await write(api, series(T0))
            else:
                with pytest.raises(gexc.InvalidArgument, match="Unknown metric"):
                    await write(api, series(T0))
            assert len(fake.points) == stored
        finally:
            await api.transport.close()
            await fake.stop()


def _break(ts: Any, how: str) -> Any:
    if how == "two points":
        ts.points.add().CopyFrom(ts.points[0])
    elif how == "int for a double":
        ts.points[0].value.int64_value = 3
    elif how == "unknown metric label":
        ts.metric.labels["gpu"] = "0"
    elif how == "missing resource label":
        del ts.resource.labels["zone"]
    elif how == "extra resource label":
        ts.resource.labels["rack"] = "r1"
    elif how == "other project":
        ts.resource.labels["project_id"] = "someone-else"
    elif how == "gauge with an earlier start":
        ts.points[0].interval.start_time.seconds = ts.points[0].interval.end_time.seconds - 10
    elif how == "26 h old":
        ts.points[0].interval.end_time.seconds -= 26 * 3600
    elif how == "6 min ahead":
        ts.points[0].interval.end_time.seconds += 360
    elif how == "unknown resource type":
        ts.resource.type = "aws_ec2_instance"
    return ts


@pytest.mark.parametrize(
    "how, message",
    [
        ("two points", "exactly one point"),
        ("int for a double", "must be DOUBLE"),
        ("unknown metric label", "Unrecognized metric labels"),
        ("missing resource label", r"Missing labels: \(zone\)"),
        ("extra resource label", r"Unrecognized resource labels: \(rack\)"),
        ("other project", "does not match the request's project"),
        ("gauge with an earlier start", "GAUGE point's start time"),
        ("26 h old", "at most 25 hours in the past"),
        ("6 min ahead", "5 minutes in the future"),
        ("unknown resource type", "Unsupported monitored resource type"),
    ],
)
async def test_malformed_series_are_refused_and_the_rest_of_the_request_stored(
    fake: FakeMetricService, client: Any, how: str, message: str
) -> None:
    await create_descriptors(client)
    with pytest.raises(gexc.InvalidArgument, match=message) as caught:
        await write(client, [_break(series(T0, VLLM_QUEUE)[0], how), *series(T0, PENDING)])
    assert partial_summary(caught.value).success_point_count == 1
    assert [p.metric_type for p in fake.points] == [PENDING]


async def test_delta_descriptors_are_refused(fake: FakeMetricService, client: Any) -> None:
    desc = descriptor_proto(DESCRIPTOR_BY_TYPE[VLLM_QUEUE], PROJECT)
    desc.metric_kind = metric_pb2.MetricDescriptor.DELTA
    with pytest.raises(gexc.InvalidArgument, match="GAUGE or CUMULATIVE"):
        await client.create_metric_descriptor(name=f"projects/{PROJECT}", metric_descriptor=desc)


@pytest.mark.parametrize(
    "code, error",
    [(grpc.StatusCode.UNAVAILABLE, gexc.ServiceUnavailable), (grpc.StatusCode.DEADLINE_EXCEEDED, gexc.DeadlineExceeded)],
)
async def test_injected_transient_faults_reach_the_client_and_store_nothing(
    fake: FakeMetricService, client: Any, code: grpc.StatusCode, error: type
) -> None:
    await create_descriptors(client)
    fake.inject("CreateTimeSeries", code)
    with pytest.raises(error):
        await write(client, series(T0))
    assert fake.points == [] and fake.calls[-1].code == code.name
    await write(client, series(T0))  # the fault was used up
    assert len(fake.points) == 1


async def test_a_deadline_exceeded_after_the_write_stored_it_so_a_retry_is_refused(fake: FakeMetricService, client: Any) -> None:
    await create_descriptors(client)
    fake.inject("CreateTimeSeries", grpc.StatusCode.DEADLINE_EXCEEDED, after_write=True)
    with pytest.raises(gexc.DeadlineExceeded):
        await write(client, series(T0))
    with pytest.raises(gexc.InvalidArgument, match="more frequently"):
        await write(client, series(T0))
    assert len(fake.points) == 1


async def test_injected_partial_failure_rejects_the_first_series_and_stores_the_rest(
    fake: FakeMetricService, client: Any
) -> None:
    await create_descriptors(client)
    fake.inject(
        "CreateTimeSeries", grpc.StatusCode.INVALID_ARGUMENT, reject_series=1, message="Field timeSeries[0] had an invalid value"
    )
    with pytest.raises(gexc.InvalidArgument) as caught:
        await write(client, series(T0, VLLM_QUEUE, PENDING))
    summary = partial_summary(caught.value)
    assert (summary.total_point_count, summary.success_point_count, summary.errors[0].point_count) == (2, 1, 1)
    assert [p.metric_type for p in fake.points] == [PENDING]


async def test_outage_and_denied_projects_answer_with_their_codes(fake: FakeMetricService, client: Any) -> None:
    fake.unavailable = True
    with pytest.raises(gexc.ServiceUnavailable):
        await create_descriptors(client)
    fake.unavailable = False
    fake.deny("locked-project")
    with pytest.raises(gexc.PermissionDenied, match="monitoring.metricDescriptors.create denied"):
        await create_descriptors(client, "locked-project")
    fake.projects = {PROJECT}
    with pytest.raises(gexc.PermissionDenied, match="monitoring.timeSeries.create denied"):
        await write(client, series(T0, resource={**VM, "project_id": "no-such-project"}), project="no-such-project")


async def test_a_plaintext_client_sends_no_credentials(fake: FakeMetricService, client: Any) -> None:
    await create_descriptors(client)
    await write(client, series(T0))
    assert fake.calls and all("authorization" not in call.metadata for call in fake.calls)
    assert fake.calls[-1].metadata["x-goog-request-params"] == f"name=projects/{PROJECT}"
