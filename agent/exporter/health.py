"""Export health: counters of points and calls, the last success and the last error,
as /status shows them and as /metrics families (gpu_node_agent_export_*)."""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

log = logging.getLogger(__name__)

RESULTS = ("ok", "failed", "dropped", "retried")
class SetupFailure(StrEnum):
    """Export failures that are not an API call's status code (those are gRPC names)."""

    CREDENTIALS = "credentials"  # no Google credentials
    RESOURCE = "resource"  # the monitored resource lacks a label
    SETUP = "setup"  # the client could not be built
    ERROR = "error"  # a bug in a round


SETUP_CODES = frozenset(SetupFailure)


@dataclass
class ExportStats:
    wall: Callable[[], float] = time.time
    points_total: Counter[str] = field(default_factory=Counter)  # by result: ok, failed, dropped, retried
    requests_total: Counter[str] = field(default_factory=Counter)  # API calls by status code, OK included
    failures_by_code: Counter[str] = field(default_factory=Counter)
    last_success_wall: float | None = None
    last_error: str | None = None
    last_error_code: str | None = None
    last_error_wall: float | None = None
    repeats: int = 0

    def written(self, points: int) -> None:
        self.points_total["ok"] += points
        if points:
            self.last_success_wall = self.wall()

    def fail(self, code: str, message: str) -> None:
        """Record an error for /status; logged at ERROR when it changes and every 10th repeat."""
        repeat = message == self.last_error
        self.repeats = self.repeats + 1 if repeat else 0
        self.last_error, self.last_error_code, self.last_error_wall = message, code, self.wall()
        if code in SETUP_CODES:
            self.failures_by_code[code] += 1  # API failures are counted per call
        level = logging.ERROR if not repeat or self.repeats % 10 == 0 else logging.DEBUG
        log.log(level, "export failed: %s", message, extra={"code": code, "repeats": self.repeats})

    @property
    def healthy(self) -> bool:
        return self.last_success_wall is not None and (
            self.last_error_wall is None or self.last_success_wall >= self.last_error_wall
        )

    def as_dict(self) -> dict[str, Any]:
        now = self.wall()
        return {
            "healthy": self.healthy,
            "last_success_at": _iso(self.last_success_wall),
            "last_success_age_s": None if self.last_success_wall is None else round(now - self.last_success_wall, 3),
            "points_written": self.points_total["ok"],
            "points_total": {result: self.points_total[result] for result in RESULTS},
            "requests_total": dict(self.requests_total),
            "failures_by_code": dict(self.failures_by_code),
            "dropped": self.points_total["dropped"],
            "last_error": self.last_error,
            "last_error_code": self.last_error_code,
            "last_error_at": _iso(self.last_error_wall),
        }

    def families(self, backlog_points: int, descriptors_ready: bool) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        points = CounterMetricFamily("gpu_node_agent_export_points", "points for Cloud Monitoring by result", labels=["result"])
        for result in RESULTS:
            points.add_metric([result], float(self.points_total[result]))
        requests = CounterMetricFamily(
            "gpu_node_agent_export_requests", "Cloud Monitoring calls by gRPC status code", labels=["code"]
        )
        for code, count in sorted(self.requests_total.items()):
            requests.add_metric([code], float(count))
        failures = CounterMetricFamily(
            "gpu_node_agent_export_failures", "export failures by code (gRPC status, credentials, resource)", labels=["code"]
        )
        for code, count in sorted(self.failures_by_code.items()):
            failures.add_metric([code], float(count))
        yield from (points, requests, failures)
        yield GaugeMetricFamily(
            "gpu_node_agent_export_backlog_points", "points waiting to be written", value=float(backlog_points)
        )
        yield GaugeMetricFamily(
            "gpu_node_agent_export_descriptors_ready", "1 once every metric descriptor exists", value=float(descriptors_ready)
        )
        if self.last_success_wall is not None:
            yield GaugeMetricFamily(
                "gpu_node_agent_export_last_success_timestamp_seconds",
                "wall time of the last accepted write",
                value=self.last_success_wall,
            )


def _iso(wall: float | None) -> str | None:
    return None if wall is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(wall))
