"""The demo's closing summary: the transitions, the termination report with its request
counts reconciled against what the simulated vLLM saw, and which series were written."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from agent.units import secs

if TYPE_CHECKING:
    from agent.demo import Demo

# Every series type the README lists: each must appear in a run, or the summary says why not.
README_SERIES = (
    "gpu/usage_percent", "gpu/memory_used_gb", "vllm/tps", "vllm/queue_length", "vllm/kv_cache_usage_gb",
    "queue/pending_requests", "vllm/ttft_ms", "vllm/tpot_ms", "node/demand", "agent/state",
    "agent/termination/count", "agent/termination/drain_seconds", "agent/termination/in_flight_at_notice",
    "agent/termination/completed_requests", "agent/termination/aborted_requests", "agent/termination/failed_requests",
)


def summary(status: dict[str, Any], demo: Demo) -> str:
    report = status.get("termination_report") or {}
    pushes = len([c for c in demo.sink.calls_of("CreateTimeSeries") if c.code == "OK"])
    lines = [
        "",
        "summary",
        "  transitions: " + " -> ".join([status["history"][0]["from"]] + [t["to"] for t in status["history"]]),
        f"  final state: {status['state']} ({status['reason']})",
        f"  termination report: {report.get('reason')} drain, {report.get('outcome')} after {secs(report.get('drain_s'))}: "
        f"{_whole(report.get('in_flight_at_notice'))} in flight at the notice, {_whole(report.get('completed'))} completed, "
        f"{_whole(report.get('aborted'))} aborted",
        *_requests(report, demo),
        f"  load balancer polls: {demo.lb_polls}; requests admitted while not ready: {demo.admitted_while_not_ready}",
        f"  export: {status['exporter'].get('points_written')} points written in {pushes} requests; "
        f"termination report in the sink: {'yes' if 'agent/termination/count' in demo.series_seen else 'no'}",
        f"  series types: {_coverage(demo.series_seen)}",
    ]
    return "\n".join(lines)


def _whole(value: Any) -> str:
    return "unknown" if value is None else f"{value:.0f}"


def _requests(report: dict[str, Any], demo: Demo) -> list[str]:
    """Why completed + aborted can exceed the in-flight count at the notice: requests that
    arrived after the agent's reading at the notice (until the load balancer saw /readyz
    503). Counted from the simulator, so the sum checks."""
    notice, completed, aborted = report.get("in_flight_at_notice"), report.get("completed"), report.get("aborted")
    started = demo.drain_started_mono
    if notice is None or completed is None or aborted is None or started is None:
        return ["  requests: the agent had no fresh in-flight count at the notice"]
    # The drain reads vLLM itself right after the notice: the answer nearest to it that says as much.
    served = [m for m in demo.vllm.served_metrics if abs(m.at_mono - started) < 2.0 and m.in_flight == round(notice)]
    if not served:
        return ["  requests: the agent's count at the notice matches no answer the simulated vLLM gave"]
    reading = min(served, key=lambda m: abs(m.at_mono - started))
    after = demo.vllm.arrived_total - reading.arrived_total
    expected, counted = round(notice) + after, round(completed) + round(aborted)
    parts = f"{round(completed)} completed + {round(aborted)} aborted"
    balance = f"= {parts}" if expected == counted else f"but the agent counted {parts} = {counted} ({counted - expected:+d})"
    if report.get("outcome") == "deadline" and aborted:
        balance += " (aborted: still running at the drain deadline)"
    return [
        f"  requests: {round(notice)} in flight at the agent's own vLLM reading at the notice",
        f"            + {after} that arrived after it, before the load balancer saw /readyz 503",
        f"            = {expected} {balance}",
    ]


def _coverage(seen: set[str]) -> str:
    missing = [name for name in README_SERIES if name not in seen]
    if not missing:
        return f"all {len(README_SERIES)} that the README lists were written"
    why = {
        "vllm/kv_cache_usage_gb": "no KV-cache size known",
        "agent/termination/in_flight_at_notice": "the agent had no fresh in-flight count at the notice",
    }
    return "not written: " + ", ".join(f"{m} ({why.get(m, 'no point before exit')})" for m in missing)
