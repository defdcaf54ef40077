"""The termination report: what the node's last drain did, logged and written to
Cloud Monitoring as the node goes away (SPEC §7). Pure.

Shape in Cloud Monitoring: five GAUGE types under custom.googleapis.com/agent/termination/,
each one point at the report's time (the end of the drain), labelled with
`reason` and `outcome`, on the node's resource:
  count (INT64, always 1: a chart of terminations by reason),
  drain_seconds, in_flight_at_notice (absent when unknown),
  completed_requests, aborted_requests, failed_requests (finished with an error).
They are new series, so the report never collides with the regular pushes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from agent.exporter.series import TERMINATION, MetricKind, SeriesPoint


class FinishedDrain(Protocol):
    """agent.drain.DrainReport, as far as the report needs it (read-only: the report is frozen)."""

    @property
    def reason(self) -> str: ...
    @property
    def detail(self) -> str: ...
    @property
    def finished_at_wall(self) -> float: ...
    @property
    def drain_s(self) -> float: ...
    @property
    def in_flight_at_notice(self) -> float | None: ...
    @property
    def completed(self) -> float: ...
    @property
    def aborted(self) -> float: ...
    @property
    def outcome(self) -> str: ...
    @property
    def failed(self) -> float: ...


@dataclass(frozen=True, slots=True)
class TerminationReport:
    """`at_wall` is when the drain ended (the report's time); `transitions` is how
    many lifecycle transitions this process went through."""

    reason: str
    outcome: str
    at_wall: float
    drain_s: float
    in_flight_at_notice: float | None
    completed: float
    aborted: float
    transitions: int = 0
    detail: str = ""
    failed: float = 0.0

    @classmethod
    def from_drain(cls, drain: FinishedDrain, *, transitions: int = 0) -> TerminationReport:
        return cls(
            reason=drain.reason,
            outcome=drain.outcome,
            at_wall=drain.finished_at_wall,
            drain_s=drain.drain_s,
            in_flight_at_notice=drain.in_flight_at_notice,
            completed=drain.completed,
            aborted=drain.aborted,
            transitions=transitions,
            detail=drain.detail,
            failed=drain.failed,
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.at_wall))
        return data


def report_points(report: TerminationReport) -> list[SeriesPoint]:
    labels = (("reason", report.reason), ("outcome", report.outcome))
    values: list[tuple[str, float | None]] = [
        ("count", 1),
        ("drain_seconds", report.drain_s),
        ("in_flight_at_notice", report.in_flight_at_notice),
        ("completed_requests", report.completed),
        ("aborted_requests", report.aborted),
        ("failed_requests", report.failed),
    ]
    return [
        SeriesPoint(TERMINATION + name, labels, MetricKind.GAUGE, float(value))
        for name, value in values
        if value is not None
    ]
