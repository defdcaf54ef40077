"""FakeMetricService: a gRPC server on loopback (grpc.aio) speaking
google.monitoring.v3.MetricService like Cloud Monitoring does for custom metrics,
for the tests and as the demo's local sink. It keeps everything it accepted.

Rules it enforces (FIELD-NOTES, "Cloud Monitoring custom metrics"): at most 200
series per request and at least one; exactly one point per series; the same series
twice in one request is rejected; the descriptor must exist (unless
`auto_create_descriptors`), kinds and value types must match it, and custom
descriptors are GAUGE or CUMULATIVE; known resource types with exactly their
labels, project_id matching the request; GAUGE start time empty or equal to the
end, CUMULATIVE start before the end; end time at most 25 h old and 5 min ahead;
per series, points in time order and at least 10 s apart. Bad series make a
partial failure: the good ones are stored, the call fails INVALID_ARGUMENT with a
CreateTimeSeriesSummary in the status details, as the real API does.

Faults: `inject()` scripts UNAVAILABLE, DEADLINE_EXCEEDED (also after the write
was stored, as a real timeout can be), partial INVALID_ARGUMENT, delays;
`unavailable = True` is an outage; `deny()` refuses a project.

    python -m agent.sim.monitoring [--port 0]   # prints {"endpoint": "127.0.0.1:PORT"}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import grpc
from google.api import metric_pb2
from google.cloud import monitoring_v3
from google.protobuf import empty_pb2
from google.rpc import status_pb2

SERVICE = "google.monitoring.v3.MetricService"
RESOURCE_LABELS: dict[str, frozenset[str]] = {
    "gce_instance": frozenset({"project_id", "instance_id", "zone"}),
    "k8s_pod": frozenset({"project_id", "location", "cluster_name", "namespace_name", "pod_name"}),
    "generic_node": frozenset({"project_id", "location", "namespace", "node_id"}),
    "global": frozenset({"project_id"}),
}
CUSTOM_PREFIXES = ("custom.googleapis.com/", "external.googleapis.com/")
MAX_AGE_S = 25 * 3600.0
MAX_AHEAD_S = 300.0
# The API's own limits, stated here and not imported from the exporter: a wrong
# number on one side then fails the tests instead of passing on both.
MAX_SERIES_PER_REQUEST = 200  # "at most 200 time series per request"
MIN_POINT_GAP_S = 10.0  # quota: "one point per time series every 10 seconds" at most
_KIND = metric_pb2.MetricDescriptor.MetricKind
_VALUE = metric_pb2.MetricDescriptor.ValueType
_ONEOF_OF_VALUE_TYPE = {
    _VALUE.DOUBLE: "double_value",
    _VALUE.INT64: "int64_value",
    _VALUE.BOOL: "bool_value",
    _VALUE.STRING: "string_value",
    _VALUE.DISTRIBUTION: "distribution_value",
}
_TS_REQUEST = monitoring_v3.CreateTimeSeriesRequest.pb()
_SUMMARY = monitoring_v3.CreateTimeSeriesSummary.pb()


@dataclass(frozen=True, slots=True)
class StoredPoint:
    project: str
    metric_type: str
    metric_labels: dict[str, str]
    resource_type: str
    resource_labels: dict[str, str]
    kind: str
    value: float
    end_wall: float
    start_wall: float | None

    @property
    def key(self) -> tuple[Any, ...]:
        return _series_key(self.project, self.metric_type, self.metric_labels, self.resource_type, self.resource_labels)

    def describe(self) -> str:
        labels = ",".join(f"{k}={v}" for k, v in sorted(self.metric_labels.items()))
        return f"{self.metric_type.removeprefix('custom.googleapis.com/')}{{{labels}}} = {self.value:g}"


@dataclass(frozen=True, slots=True)
class Call:
    method: str
    project: str
    code: str  # grpc status code name; "OK" when it succeeded
    series: int
    at_wall: float  # the fake's wall clock
    received_mono: float  # real monotonic time of arrival (for pacing)
    metadata: dict[str, str]


@dataclass(slots=True)
class Fault:
    method: str
    code: grpc.StatusCode
    times: int = 1
    message: str = ""
    after_write: bool = False  # store the write, then fail (a timeout the server did process)
    reject_series: int = 0  # INVALID_ARGUMENT partial: reject the first N series, store the rest
    delay_s: float = 0.0  # answer late; with code OK, only late


class RpcError(Exception):
    def __init__(self, code: grpc.StatusCode, message: str, summary: Any = None) -> None:
        super().__init__(message)
        self.code, self.message, self.summary = code, message, summary

    def trailers(self) -> tuple[tuple[str, bytes], ...]:
        if self.summary is None:
            return ()
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        status.details.add().Pack(self.summary)
        return (("grpc-status-details-bin", status.SerializeToString()),)


@dataclass(eq=False)
class FakeMetricService:
    """MetricService on 127.0.0.1; `points` and `calls` record what crossed the wire.
    ListMetricDescriptors ignores its filter and returns the project's descriptors."""

    wall: Callable[[], float] = time.time  # the API's clock, for the 25 h / 5 min window
    projects: Collection[str] | None = None  # None: every project exists
    auto_create_descriptors: bool = False
    unavailable: bool = False  # an outage: every call is UNAVAILABLE
    descriptors: dict[str, Any] = field(default_factory=dict, repr=False)
    points: list[StoredPoint] = field(default_factory=list, repr=False)
    calls: list[Call] = field(default_factory=list, repr=False)
    faults: list[Fault] = field(default_factory=list)
    denied: dict[str, grpc.StatusCode] = field(default_factory=dict)
    port: int | None = None
    _last_end: dict[tuple[Any, ...], float] = field(default_factory=dict, init=False, repr=False)
    _server: Any = field(default=None, init=False, repr=False)

    # --- lifecycle ---------------------------------------------------------------------
    async def start(self, host: str = "127.0.0.1", port: int = 0) -> FakeMetricService:
        unary = grpc.unary_unary_rpc_method_handler
        methods = {
            "CreateTimeSeries": unary(self._create_time_series, _TS_REQUEST.FromString, empty_pb2.Empty.SerializeToString),
            "CreateMetricDescriptor": unary(
                self._create_descriptor,
                _pb("CreateMetricDescriptorRequest").FromString,
                metric_pb2.MetricDescriptor.SerializeToString,
            ),
            "GetMetricDescriptor": unary(
                self._get_descriptor, _pb("GetMetricDescriptorRequest").FromString, metric_pb2.MetricDescriptor.SerializeToString
            ),
            "ListMetricDescriptors": unary(
                self._list_descriptors,
                _pb("ListMetricDescriptorsRequest").FromString,
                _pb("ListMetricDescriptorsResponse").SerializeToString,
            ),
        }
        self._server = grpc.aio.server()
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, methods),))
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        await self._server.start()
        return self

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=None)
            self._server = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    # --- test controls and records ---------------------------------------------------
    def inject(self, method: str, code: grpc.StatusCode, *, times: int = 1, **kwargs: Any) -> None:
        self.faults.append(Fault(method, code, times, **kwargs))

    def deny(self, project: str, code: grpc.StatusCode = grpc.StatusCode.PERMISSION_DENIED) -> None:
        self.denied[project] = code

    def series(self, metric_type: str, **labels: str) -> list[StoredPoint]:
        """Accepted points of `metric_type` whose metric labels include `labels`, in arrival order."""
        return [p for p in self.points if p.metric_type == metric_type and labels.items() <= p.metric_labels.items()]

    def latest(self) -> list[StoredPoint]:
        newest: dict[tuple[Any, ...], StoredPoint] = {}
        for point in self.points:
            newest[point.key] = point
        return list(newest.values())

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method == method]

    # --- handlers ----------------------------------------------------------------------
    async def _create_time_series(self, request: Any, context: Any) -> Any:
        return await self._serve(
            "CreateTimeSeries", request.name, context, len(request.time_series), lambda p, f: self._write(p, request, f)
        )

    async def _create_descriptor(self, request: Any, context: Any) -> Any:
        return await self._serve(
            "CreateMetricDescriptor", request.name, context, 0, lambda p, f: self._store_descriptor(p, request.metric_descriptor)
        )

    async def _get_descriptor(self, request: Any, context: Any) -> Any:
        project, _, metric_type = request.name.removeprefix("projects/").partition("/metricDescriptors/")
        return await self._serve(
            "GetMetricDescriptor", f"projects/{project}", context, 0, lambda p, f: self._descriptor(p, metric_type)
        )

    async def _list_descriptors(self, request: Any, context: Any) -> Any:
        def listing(project: str, _fault: Fault | None) -> Any:
            mine = [d for name, d in sorted(self.descriptors.items()) if name.startswith(f"projects/{project}/")]
            return _pb("ListMetricDescriptorsResponse")(metric_descriptors=mine)

        return await self._serve("ListMetricDescriptors", request.name, context, 0, listing)

    async def _serve(self, method: str, name: str, context: Any, series: int, handle: Callable[[str, Fault | None], Any]) -> Any:
        fault = self._take_fault(method)
        project = name.removeprefix("projects/")
        received = time.monotonic()
        try:
            if fault is not None and fault.delay_s:
                await asyncio.sleep(fault.delay_s)
            self._check_project(method, name, project)
            if fault is not None and fault.code is not grpc.StatusCode.OK and not (fault.after_write or fault.reject_series):
                raise RpcError(fault.code, fault.message or f"injected {fault.code.name}")
            result = handle(project, fault)
            if fault is not None and fault.after_write:
                raise RpcError(fault.code, fault.message or f"injected {fault.code.name} after the write")
        except RpcError as exc:
            # Recorded before answering: the client (often on this same loop) may look at once.
            self._record(method, project, exc.code.name, series, received, context)
            await context.abort(exc.code, exc.message, trailing_metadata=exc.trailers())
        self._record(method, project, "OK", series, received, context)
        return result

    def _record(self, method: str, project: str, code: str, series: int, received: float, context: Any) -> None:
        metadata = {k: v for k, v in context.invocation_metadata() if isinstance(v, str)}
        self.calls.append(Call(method, project, code, series, self.wall(), received, metadata))

    def _take_fault(self, method: str) -> Fault | None:
        for fault in self.faults:
            if fault.method in (method, "*") and fault.times > 0:
                fault.times -= 1
                return fault
        return None

    def _check_project(self, method: str, name: str, project: str) -> None:
        if self.unavailable:
            raise RpcError(grpc.StatusCode.UNAVAILABLE, "The service is currently unavailable.")
        if not name.startswith("projects/") or not project or "/" in project:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"Invalid resource name {name!r}: expected projects/PROJECT_ID")
        code = self.denied.get(project)
        if code is None and self.projects is not None and project not in self.projects:
            code = grpc.StatusCode.PERMISSION_DENIED
        if code is not None:
            permission = (
                "timeSeries.create"
                if method == "CreateTimeSeries"
                else "metricDescriptors." + method.removesuffix("MetricDescriptor").lower()
            )
            raise RpcError(code, f"Permission monitoring.{permission} denied (or the resource may not exist).")

    # --- descriptors ---------------------------------------------------------------------
    def _store_descriptor(self, project: str, desc: Any) -> Any:
        if not desc.type.startswith(CUSTOM_PREFIXES):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"Metric type {desc.type!r} is not a custom metric type")
        if desc.metric_kind not in (_KIND.GAUGE, _KIND.CUMULATIVE):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{desc.type}: custom metrics must be GAUGE or CUMULATIVE")
        if desc.value_type == _VALUE.VALUE_TYPE_UNSPECIFIED:
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{desc.type}: value_type is required")
        name = f"projects/{project}/metricDescriptors/{desc.type}"
        old = self.descriptors.get(name)
        if old is not None and (old.metric_kind, old.value_type) != (desc.metric_kind, desc.value_type):
            raise RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"{desc.type} already exists with another metric kind or value type")
        stored = metric_pb2.MetricDescriptor()
        stored.CopyFrom(desc)
        stored.name = name
        self.descriptors[name] = stored
        return stored

    def _descriptor(self, project: str, metric_type: str) -> Any:
        desc = self.descriptors.get(f"projects/{project}/metricDescriptors/{metric_type}")
        if desc is None:
            raise RpcError(grpc.StatusCode.NOT_FOUND, f"Could not find descriptor for metric '{metric_type}'.")
        return desc

    # --- time series ---------------------------------------------------------------------
    def _write(self, project: str, request: Any, fault: Fault | None) -> Any:
        total = len(request.time_series)
        if total == 0 or total > MAX_SERIES_PER_REQUEST:
            raise RpcError(
                grpc.StatusCode.INVALID_ARGUMENT,
                "Field timeSeries had an invalid value: "
                f"a request must contain 1 to {MAX_SERIES_PER_REQUEST} TimeSeries, got {total}",
            )
        now = self.wall()
        errors: dict[str, list[int]] = {}
        seen: set[tuple[Any, ...]] = set()
        for i, ts in enumerate(request.time_series):
            if fault is not None and i < fault.reject_series:
                error: str | None = fault.message or "injected rejection"
            else:
                error = self._accept(project, ts, now, seen)
            if error is not None:
                errors.setdefault(error, []).append(i)
        if errors:
            raise _partial_failure(total, errors)
        return empty_pb2.Empty()

    def _accept(self, project: str, ts: Any, now: float, seen: set[tuple[Any, ...]]) -> str | None:
        """Store the series' point, or say why not (the real API's wording where known)."""
        desc = self.descriptors.get(f"projects/{project}/metricDescriptors/{ts.metric.type}")
        if desc is None and self.auto_create_descriptors and ts.metric.type.startswith(CUSTOM_PREFIXES):
            desc = self._auto_descriptor(project, ts)
        if desc is None:
            return f"Unknown metric: {ts.metric.type}"
        error = _check_shape(ts, desc, project)
        if error is not None:
            return error
        point = ts.points[0]
        end = _wall(point.interval.end_time)
        start = _wall(point.interval.start_time) if point.interval.HasField("start_time") else None
        if end > now + MAX_AHEAD_S or end < now - MAX_AGE_S:
            return "The point's end time must be at most 25 hours in the past and 5 minutes in the future"
        stored = StoredPoint(
            project,
            ts.metric.type,
            dict(ts.metric.labels),
            ts.resource.type,
            dict(ts.resource.labels),
            _KIND.Name(desc.metric_kind),
            getattr(point.value, _ONEOF_OF_VALUE_TYPE[desc.value_type]),
            end,
            start,
        )
        if stored.key in seen:
            return "Duplicate TimeSeries encountered. Only one point can be written per TimeSeries per request."
        seen.add(stored.key)
        prior = self._last_end.get(stored.key)
        if prior is not None and end < prior:
            return (
                "Points must be written in order. "
                "One or more of the points specified had an older start time than the most recent point."
            )
        if prior is not None and end - prior < MIN_POINT_GAP_S:
            return "One or more points were written more frequently than the maximum sampling period configured for the metric."
        self._last_end[stored.key] = end
        self.points.append(stored)
        return None

    def _auto_descriptor(self, project: str, ts: Any) -> Any:
        oneof = ts.points[0].value.WhichOneof("value") if ts.points else None
        value_type = {v: k for k, v in _ONEOF_OF_VALUE_TYPE.items()}.get(oneof or "", _VALUE.DOUBLE)
        kind = ts.metric_kind or _KIND.GAUGE
        return self._store_descriptor(
            project, metric_pb2.MetricDescriptor(type=ts.metric.type, metric_kind=kind, value_type=value_type)
        )


def _check_shape(ts: Any, desc: Any, project: str) -> str | None:
    if len(ts.points) != 1:
        return f"Field points had an invalid value: each TimeSeries must have exactly one point, got {len(ts.points)}"
    if ts.metric_kind and ts.metric_kind != desc.metric_kind:
        return f"The metric kind {_KIND.Name(ts.metric_kind)} does not match the descriptor's {_KIND.Name(desc.metric_kind)}"
    point = ts.points[0]
    if point.value.WhichOneof("value") != _ONEOF_OF_VALUE_TYPE.get(desc.value_type):
        return f"Value type for metric {ts.metric.type} must be {_VALUE.Name(desc.value_type)}"
    unknown = set(ts.metric.labels) - {label.key for label in desc.labels}
    if unknown:
        return f"Unrecognized metric labels: {sorted(unknown)}"
    required = RESOURCE_LABELS.get(ts.resource.type)
    if required is None:
        return f"Unsupported monitored resource type {ts.resource.type!r}"
    missing, extra = sorted(required - set(ts.resource.labels)), sorted(set(ts.resource.labels) - required)
    if missing:
        return f"The set of resource labels is incomplete. Missing labels: ({' '.join(missing)})."
    if extra:
        return f"Unrecognized resource labels: ({' '.join(extra)})."
    if ts.resource.labels["project_id"] != project:
        return f"The resource's project_id {ts.resource.labels['project_id']!r} does not match the request's project"
    has_start = point.interval.HasField("start_time")
    if desc.metric_kind == _KIND.GAUGE and has_start and point.interval.start_time != point.interval.end_time:
        return "A GAUGE point's start time must be empty or equal to its end time"
    if desc.metric_kind == _KIND.CUMULATIVE and (
        not has_start or _wall(point.interval.start_time) >= _wall(point.interval.end_time)
    ):
        return "A CUMULATIVE point needs a start time before its end time"
    return None


def _partial_failure(total: int, errors: dict[str, list[int]]) -> RpcError:
    failed = sum(len(indexes) for indexes in errors.values())
    summary = _SUMMARY(total_point_count=total, success_point_count=total - failed)
    for message, indexes in errors.items():
        entry = summary.errors.add(point_count=len(indexes))
        entry.status.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
        entry.status.message = message
    text = "; ".join(f"{message}: timeSeries[{','.join(map(str, indexes))}]" for message, indexes in errors.items())
    return RpcError(grpc.StatusCode.INVALID_ARGUMENT, f"One or more TimeSeries could not be written: {text}", summary)


def _series_key(
    project: str, metric_type: str, labels: dict[str, str], resource_type: str, resource_labels: dict[str, str]
) -> tuple[Any, ...]:
    return (project, metric_type, frozenset(labels.items()), resource_type, frozenset(resource_labels.items()))


def _wall(timestamp: Any) -> float:
    return timestamp.seconds + timestamp.nanos / 1e9


def _pb(name: str) -> Any:
    return getattr(monitoring_v3, name).pb()


async def _main() -> None:
    parser = argparse.ArgumentParser(description="a fake Cloud Monitoring MetricService on loopback")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--auto-create-descriptors", action="store_true")
    args = parser.parse_args()
    fake = await FakeMetricService(auto_create_descriptors=args.auto_create_descriptors).start(port=args.port)
    print(json.dumps({"endpoint": fake.endpoint}), flush=True)
    try:
        await asyncio.Event().wait()  # serve until killed
    finally:
        await fake.stop()


if __name__ == "__main__":
    asyncio.run(_main())
