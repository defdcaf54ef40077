"""What the node pushes to Cloud Monitoring (SPEC §7): the descriptor table, the
node view -> `NodeMetrics` -> series mapping, and the TimeSeries protos. Pure.

Which series are written when a reading is missing (SPEC: never stop writing the
autoscaling series while the node serves; a missing series blocks HPA scale-down):

- `agent/state` and every vLLM series (queue_length, pending_requests, tps,
  kv_cache_usage_gb, ttft_ms, tpot_ms) are written every round, in every state.
  From a fresh vLLM reading when there is one; from zero when vLLM refuses
  connections or was never read (no server, nothing queued: a loading or
  restarting vLLM); otherwise (hung, garbage, probe stalled) the last good
  reading is held, so a wedged server never reads as idle and scales the fleet
  down. Within a reading, "no value" is written as 0: tps before the second
  scrape, a latency quantile over a window in which no request finished (no
  latency pressure). kv_cache_usage_gb is the exception: it is written only
  where the KV capacity is known, and then always.
- The GPU series (usage_percent, memory_used_gb) come from a fresh NVML reading
  of a node with GPUs only: a stale or failing NVML reading is unknown, not zero
  (GPU utilization is not the scaling signal for LLM servers, and a wedged driver
  drains the node anyway). usage_percent is also absent when no GPU reports
  utilization (MIG).
- The autoscaling series (node/demand, queue_length, pending_requests, ttft_ms,
  usage_percent) then follow the lifecycle rule of agent/demand.py when the daemon
  passes its values: 0 while INIT/WARMING, the last READY round's values held while
  DRAINING/TERMINATED, so a warming or leaving node neither adds phantom load nor
  drags the fleet's sum down.

The protobuf modules (google.cloud.monitoring_v3, ~33 MB) are imported only by
the functions that build protos, so importing this module stays cheap.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.node_view import TTFT_SERIES, NodeView, Series, VllmSource
from state_machine import State

PREFIX = "custom.googleapis.com/"
QUANTILES = ("p50", "p95", "p99")
MAX_SERIES_PER_REQUEST = 200
# Cloud Monitoring's quota: one point per series every 10 s at most, final flush included.
MIN_POINT_GAP_S = 10.0
_GB = 1e9


class MetricKind(StrEnum):
    """Custom metrics accept GAUGE and CUMULATIVE only (no DELTA)."""

    GAUGE = "GAUGE"
    CUMULATIVE = "CUMULATIVE"


class ValueType(StrEnum):
    DOUBLE = "DOUBLE"
    INT64 = "INT64"


@dataclass(frozen=True, slots=True)
class Descriptor:
    """One custom metric descriptor; `type` is the full metric type."""

    type: str
    kind: MetricKind
    value_type: ValueType
    unit: str
    description: str
    labels: tuple[tuple[str, str], ...] = ()  # (key, description)

    @property
    def short(self) -> str:
        return self.type.removeprefix(PREFIX)


def _d(short: str, value_type: ValueType, unit: str, description: str, *labels: tuple[str, str]) -> Descriptor:
    return Descriptor(PREFIX + short, MetricKind.GAUGE, value_type, unit, description, labels)


_QUANTILE_LABEL = ("quantile", "p50, p95 or p99 over the agent's sliding window")
_TERMINATION_LABELS = (
    ("reason", "why the node drained: preemption, maintenance, signal, gpu_fault, idle"),
    ("outcome", "emptied (nothing in flight), deadline (work aborted) or forced (second signal)"),
)

GPU_USAGE = PREFIX + "gpu/usage_percent"
GPU_MEMORY = PREFIX + "gpu/memory_used_gb"
VLLM_TPS = PREFIX + "vllm/tps"
VLLM_QUEUE = PREFIX + "vllm/queue_length"
VLLM_KV = PREFIX + "vllm/kv_cache_usage_gb"
PENDING = PREFIX + "queue/pending_requests"
TTFT = PREFIX + "vllm/ttft_ms"
TPOT = PREFIX + "vllm/tpot_ms"
AGENT_STATE = PREFIX + "agent/state"
NODE_DEMAND = PREFIX + "node/demand"
TERMINATION = PREFIX + "agent/termination/"

# Node-level series carry no per-GPU or per-engine labels: the MIG autoscaler and
# the HPA adapter add up every series a filter matches, so one series per node.
DESCRIPTORS: tuple[Descriptor, ...] = (
    _d("gpu/usage_percent", ValueType.DOUBLE, "%", "GPU utilization of the node, mean over its GPUs (0-100)"),
    _d("gpu/memory_used_gb", ValueType.DOUBLE, "GBy", "GPU memory in use, summed over the node's GPUs (10^9 bytes)"),
    _d("vllm/tps", ValueType.DOUBLE, "{token}/s", "tokens generated per second by the node's vLLM, all engines"),
    _d("vllm/queue_length", ValueType.DOUBLE, "{request}", "requests waiting in vLLM's queue, all engines"),
    _d("vllm/kv_cache_usage_gb", ValueType.DOUBLE, "GBy", "KV-cache in use (10^9 bytes), where the cache size is known"),
    _d("queue/pending_requests", ValueType.DOUBLE, "{request}", "requests the node still owes an answer: running + waiting"),
    _d(
        "vllm/ttft_ms",
        ValueType.DOUBLE,
        "ms",
        "time to first token over the sliding window; 0 when no request finished",
        _QUANTILE_LABEL,
    ),
    _d(
        "vllm/tpot_ms",
        ValueType.DOUBLE,
        "ms",
        "time per output token over the sliding window; 0 when no request finished",
        _QUANTILE_LABEL,
    ),
    _d("node/demand", ValueType.DOUBLE, "1", "load relative to the autoscaling targets, 1.0 = at target (agent/demand.py)"),
    _d(
        "agent/state",
        ValueType.INT64,
        "1",
        "1 for the node's lifecycle state, 0 for the others",
        ("state", "INIT, WARMING, READY, DRAINING or TERMINATED"),
    ),
    _d(
        "agent/termination/count",
        ValueType.INT64,
        "1",
        "1 per termination report, written once as the node goes away",
        *_TERMINATION_LABELS,
    ),
    _d(
        "agent/termination/drain_seconds",
        ValueType.DOUBLE,
        "s",
        "seconds from the drain's start to its end",
        *_TERMINATION_LABELS,
    ),
    _d(
        "agent/termination/in_flight_at_notice",
        ValueType.DOUBLE,
        "{request}",
        "requests in flight when the drain started (absent when unknown)",
        *_TERMINATION_LABELS,
    ),
    _d(
        "agent/termination/completed_requests",
        ValueType.DOUBLE,
        "{request}",
        "requests completed during the drain",
        *_TERMINATION_LABELS,
    ),
    _d(
        "agent/termination/aborted_requests",
        ValueType.DOUBLE,
        "{request}",
        "requests aborted during the drain (or left in flight at its deadline)",
        *_TERMINATION_LABELS,
    ),
    _d(
        "agent/termination/failed_requests",
        ValueType.DOUBLE,
        "{request}",
        "requests that finished with an error during the drain",
        *_TERMINATION_LABELS,
    ),
)
DESCRIPTOR_BY_TYPE: dict[str, Descriptor] = {d.type: d for d in DESCRIPTORS}


@dataclass(frozen=True, slots=True)
class SeriesPoint:
    """One point of one series, before the resource and the time are attached."""

    metric_type: str
    labels: tuple[tuple[str, str], ...]
    kind: MetricKind
    value: float


@dataclass(frozen=True, slots=True)
class NodeMetrics:
    """The values one round writes; None means "not written this round"."""

    state: State
    gpu_usage_percent: float | None = None
    gpu_memory_used_bytes: float | None = None
    vllm_source: VllmSource = VllmSource.DOWN
    queue_length: float | None = None
    pending_requests: float | None = None
    generation_tokens_per_s: float | None = None
    kv_cache_used_bytes: float | None = None
    ttft_s: Mapping[str, float | None] = field(default_factory=dict)
    tpot_s: Mapping[str, float | None] = field(default_factory=dict)
    node_demand: float | None = None


def node_metrics(view: NodeView) -> NodeMetrics:
    """The values one round writes, from the node view: vLLM's facts (zero load while
    vLLM is down), and where the view carries the autoscaling values (agent/demand.py's
    lifecycle rule) those instead for the series the autoscalers act on."""
    gpu_live, vllm = view.gpu, view.vllm
    live = None if view.vllm_source is VllmSource.DOWN else vllm
    auto = view.autoscaling
    if auto is not None:
        gpu_usage: float | None = auto.get(Series.GPU_USAGE_PERCENT)
        queue: float | None = auto.get(Series.QUEUE_LENGTH)
        pending: float | None = auto.get(Series.PENDING_REQUESTS)
        ttft: Mapping[str, float | None] = {
            q: None if (ms := auto.get(series)) is None else ms / 1000.0 for q, series in TTFT_SERIES.items()
        }
    else:
        gpu_usage = None if gpu_live is None else gpu_live.utilization_percent_mean
        queue = 0.0 if live is None else _or_zero(live.requests_waiting if live.queue_waiting is None else live.queue_waiting)
        pending = 0.0 if live is None else _or_zero(live.in_flight)
        ttft = _quantiles({} if live is None else live.ttft_s)
    return NodeMetrics(
        state=view.state,
        gpu_usage_percent=gpu_usage,
        gpu_memory_used_bytes=None if gpu_live is None else gpu_live.memory_used_bytes_total,
        vllm_source=view.vllm_source,
        queue_length=queue,
        pending_requests=pending,
        generation_tokens_per_s=0.0 if live is None else _or_zero(live.generation_tokens_per_s),
        kv_cache_used_bytes=_kv_used(view),
        ttft_s=ttft,
        tpot_s=_quantiles({} if live is None else live.tpot_s),
        node_demand=None if auto is None else auto.get(Series.DEMAND),
    )


def _kv_used(view: NodeView) -> float | None:
    """Written only where the KV capacity is known (even DOWN: the last reading says so), then always."""
    vllm = view.vllm
    if vllm is None or vllm.kv_cache_used_bytes is None:
        return None
    return 0.0 if view.vllm_source is VllmSource.DOWN else float(vllm.kv_cache_used_bytes)


def _or_zero(value: float | None) -> float:
    return 0.0 if value is None else float(value)


def _quantiles(values: Mapping[str, float | None]) -> dict[str, float]:
    return {q: _or_zero(values.get(q)) for q in QUANTILES}


def series_points(m: NodeMetrics) -> list[SeriesPoint]:
    """One point per series; never two points of one series (one request may carry them all)."""
    points: list[SeriesPoint] = []

    def add(metric_type: str, value: float | None, *labels: tuple[str, str]) -> None:
        if value is not None:
            points.append(SeriesPoint(metric_type, labels, MetricKind.GAUGE, float(value)))

    add(GPU_USAGE, m.gpu_usage_percent)
    add(GPU_MEMORY, None if m.gpu_memory_used_bytes is None else m.gpu_memory_used_bytes / _GB)
    add(VLLM_TPS, m.generation_tokens_per_s)
    add(VLLM_QUEUE, m.queue_length)
    add(VLLM_KV, None if m.kv_cache_used_bytes is None else m.kv_cache_used_bytes / _GB)
    add(PENDING, m.pending_requests)
    add(NODE_DEMAND, m.node_demand)
    for metric_type, values in ((TTFT, m.ttft_s), (TPOT, m.tpot_s)):
        for q in QUANTILES:
            seconds = values.get(q)
            add(metric_type, None if seconds is None else seconds * 1000.0, ("quantile", q))
    for state in State:
        add(AGENT_STATE, 1.0 if m.state is state else 0.0, ("state", state.value))
    return points


# --- protos (google.cloud.monitoring_v3 imported on first use) -----------------------


def descriptor_proto(desc: Descriptor, project_id: str) -> Any:
    """The google.api.MetricDescriptor to create for `desc` in `project_id`."""
    from google.api import label_pb2, metric_pb2

    kinds = metric_pb2.MetricDescriptor.MetricKind
    values = metric_pb2.MetricDescriptor.ValueType
    return metric_pb2.MetricDescriptor(
        name=f"projects/{project_id}/metricDescriptors/{desc.type}",
        type=desc.type,
        metric_kind=kinds.Value(desc.kind.value),
        value_type=values.Value(desc.value_type.value),
        unit=desc.unit,
        description=desc.description,
        display_name=desc.short,
        labels=[
            label_pb2.LabelDescriptor(key=k, value_type=label_pb2.LabelDescriptor.STRING, description=text)
            for k, text in desc.labels
        ],
    )


def time_series_protos(
    points: Sequence[SeriesPoint],
    resource_type: str,
    resource_labels: Mapping[str, str],
    end_wall: float,
    *,
    start_wall: float | None = None,
) -> list[Any]:
    """Raw `google.monitoring.v3.TimeSeries` messages, one point each.

    GAUGE points have no start time; CUMULATIVE ones start at `start_wall` (the
    caller keeps it constant until a reset), which must be before `end_wall`.
    """
    from google.api import metric_pb2, monitored_resource_pb2
    from google.cloud import monitoring_v3

    ts_cls = monitoring_v3.TimeSeries.pb()
    kinds = metric_pb2.MetricDescriptor.MetricKind
    values = metric_pb2.MetricDescriptor.ValueType
    resource = monitored_resource_pb2.MonitoredResource(type=resource_type, labels=dict(resource_labels))
    end = _timestamp(end_wall)
    out = []
    for p in points:
        desc = DESCRIPTOR_BY_TYPE[p.metric_type]
        ts = ts_cls(metric_kind=kinds.Value(p.kind.value), value_type=values.Value(desc.value_type.value))
        ts.metric.type = p.metric_type
        ts.metric.labels.update(p.labels)
        ts.resource.CopyFrom(resource)
        point = ts.points.add()
        point.interval.end_time.CopyFrom(end)
        if p.kind is MetricKind.CUMULATIVE:
            if start_wall is None or start_wall >= end_wall:
                raise ValueError(f"{p.metric_type}: a CUMULATIVE point needs a start time before its end time")
            point.interval.start_time.CopyFrom(_timestamp(start_wall))
        if desc.value_type is ValueType.INT64:
            point.value.int64_value = int(p.value)
        else:
            point.value.double_value = p.value
        out.append(ts)
    return out


def create_request(project_id: str, series: Sequence[Any]) -> Any:
    """A CreateTimeSeriesRequest wrapping the raw protos (no copy)."""
    from google.cloud import monitoring_v3

    if len(series) > MAX_SERIES_PER_REQUEST:
        raise ValueError(f"{len(series)} series in one request; the API takes at most {MAX_SERIES_PER_REQUEST}")
    raw = monitoring_v3.CreateTimeSeriesRequest.pb()(name=f"projects/{project_id}", time_series=series)
    return monitoring_v3.CreateTimeSeriesRequest(raw)


def _timestamp(wall: float) -> Any:
    from google.protobuf import timestamp_pb2

    seconds = int(wall // 1)
    carry, nanos = divmod(round((wall - seconds) * 1e9), 1_000_000_000)  # wall - seconds is exact
    return timestamp_pb2.Timestamp(seconds=seconds + carry, nanos=nanos)
