"""Units of what is exported, checked against Cloud Monitoring's rules: every
descriptor's unit parses under the UCUM subset the API accepts, each metric carries
the unit its meaning calls for, and each value is written on that unit's scale
(percent 0-100 with "%", ratios 0-1 with "1", bytes as 10^9 with "GBy", ms as ms)."""

from __future__ import annotations

import re

import pytest

from agent.exporter import series as s
from agent.exporter.report import TerminationReport, report_points
from state_machine import State

# Cloud Monitoring's MetricDescriptor.unit grammar (UCUM subset):
#   Expression = Component { "." Component } { "/" Component } ;
#   Component  = ( [ PREFIX ] UNIT | "%" ) [ Annotation ] | Annotation | "1" ;
_UNITS = "bit|By|s|min|h|d|1"
_PREFIXES = "k|M|G|T|P|E|Z|Y|m|u|n|p|f|a|z|y|Ki|Mi|Gi|Ti|Pi|Ei|Zi|Yi"
_ANNOTATION = r"\{[^{}]*\}"
_COMPONENT = rf"(?:(?:(?:{_PREFIXES})?(?:{_UNITS})|%)(?:{_ANNOTATION})?|{_ANNOTATION}|1)"
_EXPRESSION = re.compile(rf"{_COMPONENT}(?:\.{_COMPONENT})*(?:/{_COMPONENT})*")

# What each metric's meaning calls for (a mismatch here is a wrong number on a dashboard).
EXPECTED_UNIT = {
    "gpu/usage_percent": "%",
    "gpu/memory_used_gb": "GBy",
    "vllm/tps": "{token}/s",
    "vllm/queue_length": "{request}",
    "vllm/kv_cache_usage_gb": "GBy",
    "queue/pending_requests": "{request}",
    "vllm/ttft_ms": "ms",
    "vllm/tpot_ms": "ms",
    "node/demand": "1",
    "agent/state": "1",
    "agent/termination/count": "1",
    "agent/termination/drain_seconds": "s",
    "agent/termination/in_flight_at_notice": "{request}",
    "agent/termination/completed_requests": "{request}",
    "agent/termination/aborted_requests": "{request}",
    "agent/termination/failed_requests": "{request}",
}


@pytest.mark.parametrize("descriptor", s.DESCRIPTORS, ids=lambda d: d.short)
def test_every_descriptor_unit_is_valid_ucum_and_the_one_its_meaning_calls_for(descriptor: s.Descriptor) -> None:
    assert _EXPRESSION.fullmatch(descriptor.unit), (
        f"{descriptor.short}: {descriptor.unit!r} is not a unit Cloud Monitoring accepts"
    )
    assert descriptor.unit == EXPECTED_UNIT[descriptor.short]


def test_the_grammar_check_rejects_what_the_api_rejects() -> None:
    for bad in ("percent", "GB", "bytes", "msec", "%%", "requests"):
        assert not _EXPRESSION.fullmatch(bad), bad


def test_every_descriptor_is_checked() -> None:
    assert {d.short for d in s.DESCRIPTORS} == set(EXPECTED_UNIT)


def test_values_are_written_on_their_units_scale() -> None:
    metrics = s.NodeMetrics(
        state=State.READY,
        gpu_usage_percent=87.0,  # NVML's 0-100
        gpu_memory_used_bytes=20e9,
        queue_length=3,
        pending_requests=5,
        generation_tokens_per_s=1500.0,
        kv_cache_used_bytes=4.5e9,
        ttft_s={"p50": 0.12, "p95": 0.25, "p99": 0.4},
        tpot_s={"p50": 0.02, "p95": 0.03, "p99": 0.05},
        node_demand=0.7,
    )
    points = {(p.metric_type.removeprefix(s.PREFIX), p.labels): p.value for p in s.series_points(metrics)}
    assert points[("gpu/usage_percent", ())] == 87.0  # percent with "%": 0-100, not 0.87
    assert points[("gpu/memory_used_gb", ())] == 20.0  # GBy: 10^9 bytes
    assert points[("vllm/kv_cache_usage_gb", ())] == 4.5
    assert points[("vllm/ttft_ms", (("quantile", "p95"),))] == 250.0  # ms, from seconds
    assert points[("vllm/tpot_ms", (("quantile", "p99"),))] == 50.0
    assert points[("node/demand", ())] == 0.7  # a ratio with "1"
    assert points[("agent/state", (("state", "READY"),))] == 1.0
    assert all(0.0 <= v <= 100.0 for (t, _), v in points.items() if EXPECTED_UNIT[t] == "%")


def test_the_termination_report_is_written_in_its_units() -> None:
    report = TerminationReport("preemption", "deadline", 100.0, 18.5, 12.0, 10.0, 2.0, failed=1.0)
    points = {p.metric_type.removeprefix(s.PREFIX): p.value for p in report_points(report)}
    assert points["agent/termination/drain_seconds"] == 18.5  # s, not ms
    assert points["agent/termination/count"] == 1
