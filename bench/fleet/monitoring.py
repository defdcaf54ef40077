"""Cloud Monitoring as each autoscaler reads a node's series: the points a node wrote
(time, value), and what the MIG autoscaler and the HPA's custom-metrics adapter see of
them `now` (Fidelity's staleness knobs; 0 reads the latest point as it is written)."""

from __future__ import annotations

from collections import deque

ADAPTER_MAX_AGE_S = 300.0  # custom-metrics-stackdriver-adapter serves a GAUGE point up to ~5 min old
_KEEP = 16


class Points:
    """The points one node wrote for the series its fleet scales on (a few minutes' worth)."""

    __slots__ = ("_points",)

    def __init__(self) -> None:
        self._points: deque[tuple[float, float]] = deque(maxlen=_KEEP)

    def add(self, t_s: float, value: float | None) -> None:
        if value is not None:
            self._points.append((t_s, value))

    def mig_view(self, now_s: float, window_s: float, delay_s: float) -> float | None:
        """The mean over (now - delay - window, now - delay]; with no window, the latest
        point written by now - delay. None: no point there."""
        until = now_s - delay_s
        if window_s <= 0:
            return self.latest(until)
        inside = [v for t, v in self._points if until - window_s < t <= until]
        return sum(inside) / len(inside) if inside else None

    def hpa_view(self, now_s: float, delay_s: float) -> float | None:
        """The latest point written by now - delay, if the adapter still serves it."""
        until = now_s - delay_s
        for t, v in reversed(self._points):
            if t <= until:
                return v if until - t <= ADAPTER_MAX_AGE_S else None
        return None

    def latest(self, until_s: float) -> float | None:
        for t, v in reversed(self._points):
            if t <= until_s:
                return v
        return None
