"""`gpu-node-agent status`: the /status document as an SRE reads it at 3 a.m.

A headline (what state, why, for how long, what next), the warnings that need a
person, the readings in one aligned column (<= 100 columns, a unit on every number),
the termination report, the last transitions. Standard library only; every key is
read with .get, so an older agent's document renders too.
"""

from __future__ import annotations

import time
from typing import Any

from agent.status_readings import reading_rows
from agent.status_warnings import warnings
from agent.units import bullet, count, fit, secs

_GOING_AWAY = "nothing to do, the node is going away"
_NEXT_BY_REASON = {
    "preemption": _GOING_AWAY,
    "maintenance": _GOING_AWAY,
    "gpu_fault": "the node is going away (GPU fault, see the warnings)",
    "idle": "idle watchdog: the node is going away",
    "signal": "nothing to do, the agent exits once the node is empty",
}
_HISTORY = 5


def render(status: dict[str, Any]) -> str:
    found = warnings(status)
    lines = [fit(headline(status, len(found)))]
    if found:
        lines += ["", f"warnings ({len(found)})"]
        for text in found:
            lines += bullet(text)
    lines.append("")
    lines += reading_rows(status)
    lines += _report(status.get("termination_report"))
    lines += _history(status.get("history") or [])
    return "\n".join(lines)


def headline(status: dict[str, Any], n_warnings: int = 0) -> str:
    state = str(status.get("state") or "UNKNOWN")
    since = f"for {secs(status.get('seconds_in_state'))}"
    reason = status.get("reason") or "-"
    drain = status.get("drain") or {}
    if state == "DRAINING" and drain:
        return _draining(status, drain, since)
    if state == "TERMINATED":
        report = status.get("termination_report") or {}
        why = drain.get("reason") or str(reason).removesuffix("_drained")
        outcome = f", {report['outcome']}" if report.get("outcome") else ""
        return f"TERMINATED ({why}{outcome}) {since} - {_terminated_next(status, why)}"
    if state == "READY":
        todo = f"see the {n_warnings} warning(s) below" if n_warnings else "nothing to do"
        return f"READY {since}, {_in_flight_now(status, drain)} - serving; {todo}"
    if state == "WARMING":
        return f"WARMING ({reason}) {since} - {_warming_next(status)}"
    return f"{state} ({reason}) {since} - starting up"


def _draining(status: dict[str, Any], drain: dict[str, Any], since: str) -> str:
    reason = drain.get("reason") or "-"
    in_flight = _in_flight_now(status, drain)
    if reason == "admin":
        if drain.get("drained"):
            return f"DRAINING (admin, drained) {since} - out of rotation; `gpu-node-agent resume` to serve again"
        return f"DRAINING (admin) {since}, {in_flight} - waiting for them; `gpu-node-agent resume` to undo"
    left = f", {secs(drain.get('deadline_in_s'))} left" if drain.get("terminal") else ""
    return f"DRAINING ({reason}) {since}{left}, {in_flight} - {_NEXT_BY_REASON.get(reason, _GOING_AWAY)}"


def _in_flight_now(status: dict[str, Any], drain: dict[str, Any]) -> str:
    progress = drain.get("progress") or {}
    if progress.get("in_flight_now") is not None:
        return f"{count(progress['in_flight_now'])} in flight"
    vllm = (status.get("readings") or {}).get("vllm") or {}
    if vllm.get("value") and not vllm.get("stale"):
        return f"{count(vllm['value'].get('in_flight'))} in flight"
    return "in flight unknown"


def _warming_next(status: dict[str, Any]) -> str:
    held_by = (status.get("readiness") or {}).get("held_by")
    health = ((status.get("readings") or {}).get("inference") or {}).get("value") or {}
    if held_by:
        return f"vLLM is healthy; readiness held: {held_by}"
    if health.get("ok"):
        after = (status.get("readiness") or {}).get("ready_after")
        return f"vLLM is healthy; READY after {count(after) if after else 'a few'} checks in a row"
    if health.get("code") == "refused":
        return "vLLM is not listening yet (loading its model?); check vLLM if it lasts"
    detail = str(health.get("detail") or health.get("code") or "no health check yet")
    said = f"vLLM {detail}" if detail.startswith("/") else f"vLLM /health: {detail}"
    return f"{said}; check vLLM (journalctl -u vllm)"


def _terminated_next(status: dict[str, Any], why: str) -> str:
    if why == "idle":
        result = (status.get("idle") or {}).get("action_result") or {}
        if result:
            return "the idle action ran" if result.get("returncode") == 0 else "the idle action failed (see the warnings)"
    if why == "signal":
        return "the agent is exiting"
    return _GOING_AWAY


def _report(report: dict[str, Any] | None) -> list[str]:
    if not report:
        return []
    reason = report.get("reason")
    notice = report.get("in_flight_at_notice")
    finished = report.get("finished_at_wall")
    at = time.strftime(", finished %H:%M:%SZ", time.gmtime(finished)) if isinstance(finished, (int, float)) else ""
    lines = ["", "drain report (admin drains do not terminate)" if reason == "admin" else "termination report"]
    lines += bullet(f"{reason} drain, {report.get('outcome')} after {secs(report.get('drain_s'))}{at}", mark="-")
    lines += bullet(f"requests: {count(notice) if notice is not None else 'unknown'} in flight at the notice, "
                    f"{count(report.get('completed'))} completed, {count(report.get('aborted'))} aborted", mark="-")
    if report.get("detail"):
        lines += bullet(f"why: {report['detail']}", mark="-")
    return lines


def _history(history: list[dict[str, Any]]) -> list[str]:
    if not history:
        return []
    shown = history[-_HISTORY:]
    lines = ["", f"history (last {len(shown)} of {len(history)})"]
    for t in shown:
        change = f"{t.get('from')} -> {t.get('to')}"
        detail = f": {t['detail']}" if t.get("detail") else ""
        lines += bullet(f"{t.get('at')}  {change:<22} {t.get('reason')} ({t.get('source')}){detail}", mark="")
    return lines
