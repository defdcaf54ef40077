"""How late the event loop runs: a task that asks to wake every `interval_s` and
records by how much it overslept. A stall here is a /readyz answer that waited just
as long: the figure an SRE needs when probes time out (gpu_node_agent_event_loop_lag_*)."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

STALL_S = 0.05  # a lag this long is counted as a stall (a GKE probe's timeout is 1-2 s)


class LoopMonitor:
    def __init__(self, interval_s: float = 0.25, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._interval_s = interval_s
        self._clock = clock
        self._lags: deque[tuple[float, float]] = deque(maxlen=max(1, int(window_s / interval_s)))
        self.stalls_total = 0
        self.worst_lag_s = 0.0

    async def run(self) -> None:
        while True:
            due = self._clock() + self._interval_s
            await asyncio.sleep(self._interval_s)
            lag = max(0.0, self._clock() - due)
            self._lags.append((due, lag))
            self.worst_lag_s = max(self.worst_lag_s, lag)
            if lag >= STALL_S:
                self.stalls_total += 1

    def recent_max_s(self) -> float:
        """The worst lag over the window (the last minute by default)."""
        return max((lag for _, lag in self._lags), default=0.0)

    def describe(self) -> dict[str, float | int]:
        return {
            "max_ms_last_minute": round(self.recent_max_s() * 1000, 3),
            "worst_ms": round(self.worst_lag_s * 1000, 3),
            "stalls_total": self.stalls_total,
        }

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gpu_node_agent_event_loop_lag_seconds", "worst event-loop lag over the last minute", value=self.recent_max_s()
        )
        yield CounterMetricFamily(
            "gpu_node_agent_event_loop_stalls",
            f"event-loop lags of {STALL_S * 1000:g} ms or more",
            value=float(self.stalls_total),
        )
