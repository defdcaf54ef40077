"""/metrics: one custom prometheus_client Collector that builds every family from
the lifecycle, the node view and the snapshot's reading ages at scrape time (no
second set of Gauges to sync). It never imports a probe: readings come in the view."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent.core.snapshot import Snapshot
from agent.node_view import GpuReading, HostReading, NodeView, VllmReading
from state_machine import Lifecycle, State

_QUANTILES = ("p50", "p95", "p99")
_QUANTILE_LABEL = {"p50": "0.5", "p95": "0.95", "p99": "0.99"}


class NodeNow(Protocol):
    def now(self) -> NodeView: ...


class MetricsSource(Protocol):
    lifecycle: Lifecycle
    snapshot: Snapshot  # every reading's age and staleness

    @property
    def node(self) -> NodeNow:
        """agent/node_view.py: what the node reads, one number per quantity."""
        ...
    probe_errors: Any  # Counter[str]
    gpu_faults: Any  # GpuFaultPolicy

    def broken(self) -> list[str]: ...


class AgentCollector(Collector):
    def __init__(self, source: MetricsSource) -> None:
        self._source = source

    def collect(self) -> Iterator[Metric]:
        view = self._source.node.now()
        yield from self._lifecycle()
        yield from self._probes()
        yield from self._vllm(view.vllm_last)
        yield from self._gpu(view.gpu_last)
        yield from self._host(view.host_last)
        yield from self._gpu_faults()
        if view.autoscaling is not None:
            doc = "load relative to the autoscaling targets; 1.0 = at target"
            yield _gauge("gpu_node_agent_node_demand_ratio", doc, view.demand)
        exporter = getattr(self._source, "exporter", None)
        if exporter is not None:
            yield from exporter.collect()
        guard = getattr(self._source, "http_guard", None)
        if guard is not None:
            yield from guard.collect()
        monitor = getattr(self._source, "loop_monitor", None)
        if monitor is not None:
            yield from monitor.collect()
        logs = getattr(self._source, "log_stats", None)
        if logs is not None:
            yield CounterMetricFamily(
                "gpu_node_agent_log_records_dropped",
                "log records dropped: the log writer could not keep up (stdout blocked?)",
                value=float(logs.dropped),
            )
            yield CounterMetricFamily(
                "gpu_node_agent_log_write_errors",
                "log records that could not be written (stdout closed?)",
                value=float(logs.write_errors),
            )

    def _lifecycle(self) -> Iterator[Metric]:
        lifecycle = self._source.lifecycle
        state = GaugeMetricFamily("gpu_node_agent_state", "1 for the current lifecycle state", labels=["state"])
        for candidate in State:
            state.add_metric([candidate.value], 1.0 if lifecycle.state is candidate else 0.0)
        yield state
        yield GaugeMetricFamily("gpu_node_agent_ready", "1 when /readyz answers 200", value=float(lifecycle.is_ready))
        yield GaugeMetricFamily(
            "gpu_node_agent_state_seconds", "seconds in the current state", value=lifecycle.seconds_in_state()
        )
        transitions = CounterMetricFamily("gpu_node_agent_transitions", "lifecycle transitions", labels=["from", "to", "reason"])
        for (src, dst, reason), count in sorted(lifecycle.transitions_total.items()):
            transitions.add_metric([src, dst, reason], float(count))
        yield transitions
        drain = lifecycle.drain
        draining = GaugeMetricFamily("gpu_node_agent_draining", "1 while a drain runs, by reason", labels=["reason"])
        if drain is not None:
            draining.add_metric([drain.reason.value], 1.0)
        yield draining

    def _probes(self) -> Iterator[Metric]:
        snapshot = self._source.snapshot
        now = snapshot.now()
        errors = CounterMetricFamily("gpu_node_agent_probe_errors", "failed probe samples", labels=["probe"])
        for probe, count in sorted(self._source.probe_errors.items()):
            errors.add_metric([probe], float(count))
        yield errors
        age = GaugeMetricFamily("gpu_node_agent_reading_age_seconds", "age of the last good reading", labels=["key"])
        stale = GaugeMetricFamily("gpu_node_agent_reading_stale", "1 when a reading is stale", labels=["key"])
        for key, reading in sorted(snapshot.items()):
            reading_age = reading.age_s(now)
            if reading_age is not None:
                age.add_metric([key], reading_age)
            stale.add_metric([key], float(reading.is_stale(now)))
        yield age
        yield stale
        broken = GaugeMetricFamily(
            "gpu_node_agent_up", "1 while no critical task is crash-looping", value=float(not self._source.broken())
        )
        yield broken

    def _vllm(self, vllm: VllmReading | None) -> Iterator[Metric]:
        if vllm is None:
            return
        yield _gauge(
            "gpu_node_agent_vllm_requests_waiting", "requests waiting (queue length), all engines", vllm.requests_waiting
        )
        yield _gauge("gpu_node_agent_vllm_requests_running", "requests running, all engines", vllm.requests_running)
        yield _gauge(
            "gpu_node_agent_vllm_queue_length", "requests waiting for capacity: the queue the autoscalers see", vllm.queue_waiting
        )
        yield _gauge(
            "gpu_node_agent_vllm_requests_deferred",
            "requests waiting on a KV transfer or a LoRA budget (not demand)",
            vllm.waiting_deferred,
        )
        yield _gauge("gpu_node_agent_vllm_engines_unhealthy", "engines whose vllm:engine_healthy is 0", vllm.engines_unhealthy)
        yield _quantiles(
            "gpu_node_agent_vllm_queue_time_seconds", "time requests waited in vLLM's queue over the window", vllm.queue_time_s
        )
        yield _gauge(
            "gpu_node_agent_vllm_kv_cache_usage_ratio", "KV-cache usage 0-1, max over engines", vllm.kv_cache_usage_ratio
        )
        yield _gauge(
            "gpu_node_agent_vllm_kv_cache_used_bytes",
            "KV-cache bytes in use, where the capacity is known",
            vllm.kv_cache_used_bytes,
        )
        yield _gauge(
            "gpu_node_agent_vllm_generation_tokens_per_second", "generated tokens per second", vllm.generation_tokens_per_s
        )
        yield _gauge("gpu_node_agent_vllm_prompt_tokens_per_second", "prompt tokens per second", vllm.prompt_tokens_per_s)
        yield _gauge("gpu_node_agent_vllm_goodput_ratio", "share of the window's requests within the SLO", vllm.goodput_ratio)
        yield _quantiles("gpu_node_agent_vllm_ttft_seconds", "time to first token over the window", vllm.ttft_s)
        yield _quantiles("gpu_node_agent_vllm_tpot_seconds", "time per output token over the window", vllm.tpot_s)
        yield _quantiles("gpu_node_agent_vllm_e2e_seconds", "end-to-end request latency over the window", vllm.e2e_s)
        finished = CounterMetricFamily(
            "gpu_node_agent_vllm_requests_finished", "finished requests by reason", labels=["finished_reason"]
        )
        for reason, count in sorted(vllm.requests_finished_total.items()):
            finished.add_metric([reason], float(count))
        yield finished

    def _gpu(self, gpu: GpuReading | None) -> Iterator[Metric]:
        if gpu is None:
            return
        util = GaugeMetricFamily("gpu_node_agent_gpu_utilization_ratio", "GPU utilization 0-1", labels=["gpu"])
        used = GaugeMetricFamily("gpu_node_agent_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu"])
        total = GaugeMetricFamily("gpu_node_agent_gpu_memory_total_bytes", "GPU memory size", labels=["gpu"])
        temp = GaugeMetricFamily("gpu_node_agent_gpu_temperature_celsius", "GPU temperature", labels=["gpu"])
        power = GaugeMetricFamily("gpu_node_agent_gpu_power_watts", "GPU power draw", labels=["gpu"])
        lost = GaugeMetricFamily("gpu_node_agent_gpu_lost", "1 when NVML reports the GPU lost", labels=["gpu"])
        for info in gpu.gpus:
            label = [str(info.index)]
            if info.utilization_percent is not None:
                util.add_metric(label, info.utilization_percent / 100.0)
            _add(used, label, info.memory_used_bytes)
            _add(total, label, info.memory_total_bytes)
            _add(temp, label, info.temperature_c)
            _add(power, label, info.power_w)
            lost.add_metric(label, float(info.lost))
        yield from (util, used, total, temp, power, lost)
        # Not gpu_count: a _count suffix belongs to histograms and summaries (promtool).
        yield GaugeMetricFamily("gpu_node_agent_gpus", "GPUs NVML sees", value=float(gpu.gpu_count))

    def _gpu_faults(self) -> Iterator[Metric]:
        faults = CounterMetricFamily(
            "gpu_node_agent_gpu_faults", "GPU faults seen (XID, lost, row remap)", labels=["kind", "fatal"]
        )
        for (kind, fatal), count in sorted(self._source.gpu_faults.faults_total.items(), key=str):
            faults.add_metric([str(getattr(kind, "value", kind)), str(bool(fatal)).lower()], float(count))
        yield faults

    def _host(self, host: HostReading | None) -> Iterator[Metric]:
        if host is None:
            return
        yield _gauge("gpu_node_agent_host_cpu_ratio", "host CPU use 0-1", host.cpu_percent / 100.0)
        yield _gauge("gpu_node_agent_host_memory_used_bytes", "host memory in use", host.memory_used_bytes)
        yield _gauge("gpu_node_agent_resident_memory_bytes", "RSS of the agent", host.agent_rss_bytes)
        yield _gauge("gpu_node_agent_inference_resident_memory_bytes", "RSS of the inference server", host.inference_rss_bytes)


def _gauge(name: str, doc: str, value: float | None) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc)
    if value is not None:
        family.add_metric([], float(value))
    return family


def _add(family: GaugeMetricFamily, labels: list[str], value: float | None) -> None:
    if value is not None:
        family.add_metric(labels, float(value))


def _quantiles(name: str, doc: str, values: dict[str, float | None]) -> Metric:
    """A summary family: a `quantile` label belongs to summaries only (promtool). The
    quantiles are over the sliding window; no _count/_sum, which a window does not have
    in the cumulative sense a summary's would."""
    family = Metric(name, doc, "summary")
    for key in _QUANTILES:
        value = values.get(key)
        if value is not None:
            family.add_sample(name, {"quantile": _QUANTILE_LABEL[key]}, float(value))
    return family
