"""The two fleet autoscalers, as documented, on a per-node gauge with a per-node target.

MIG autoscaler (Compute Engine docs, "Understanding autoscaler decisions" and
"Scaling based on Cloud Monitoring metrics"), evaluated every `decision_interval_s`:

1. Raw recommendation = ceil(sum of the latest point of each VM / utilization target),
   leaving out VMs still in their initialization period ("the autoscaler ignores
   data from VMs that are still initializing"). No data at all: the current size.
2. Stabilization: the recommended size is the peak raw recommendation over the last
   10 minutes (now - 10 min, now], so scale-out is immediate and scale-in follows the peak.
3. Scale-in controls: never below (the largest size of the trailing `scale_in_window_s`)
   - `max_scaled_in_replicas`. Then min/max replicas.

HPA (kubernetes pkg/controller/podautoscaler: replica_calculator.go
calcPlainMetricReplicas for a Pods metric with an AverageValue target, then
horizontal.go stabilizeRecommendationWithBehaviors and
convertDesiredReplicasWithBehaviorRate), every `sync_period_s`:

1. Pods being deleted are ignored; Pending pods are "ignored"; running pods without a
   point are "missing". ratio = mean(points) / target. With nothing ignored (or a
   ratio <= 1) and nothing missing: within the tolerance keep the current count, else
   ceil(ratio * pods with points). Otherwise missing pods count as the target on a
   scale-down and 0 on a scale-up, ignored ones as 0 on a scale-up; the ratio is
   recomputed and the scale is kept if it is within the tolerance or flips direction;
   else ceil(new ratio * pods counted).
2. Stabilization: the result is clamped between the lowest recommendation of the
   scale-up window and the highest of the scale-down window.
3. Rate policies (Pods or Percent per period, the one allowing the biggest change):
   the change is limited against the size at the start of each period, from the
   scale events of that period. Then min/max replicas.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum


@dataclass(frozen=True, slots=True)
class Member:
    """A VM or pod as the autoscaler sees it: its latest point (None: none yet)."""

    value: float | None
    age_s: float
    pending: bool = False  # HPA: pod not running yet (its node is still being created)


def _ceil(x: float) -> int:
    # Float sums of exact quotients (2.0000000000000004) must not add a node.
    return math.ceil(x - 1e-9)


@dataclass(frozen=True, slots=True)
class MigParams:
    target: float
    min_replicas: int = 1
    max_replicas: int = 20
    initialization_period_s: float = 900.0  # deploy/gce/provision.py cool_down_s
    stabilization_s: float = 600.0  # fixed by the MIG autoscaler
    max_scaled_in_replicas: int = 1  # deploy/gce/provision.py scale_in_control
    scale_in_window_s: float = 600.0
    decision_interval_s: float = 60.0


def mig_raw_recommendation(members: Sequence[Member], params: MigParams, current: int) -> int:
    values = [m.value for m in members if m.value is not None and m.age_s >= params.initialization_period_s]
    if not values:
        return current
    return _ceil(sum(values) / params.target)


class MigAutoscaler:
    def __init__(self, params: MigParams) -> None:
        self.p = params
        self._raw: deque[tuple[float, int]] = deque()
        self._sizes: deque[tuple[float, int]] = deque()

    @property
    def interval_s(self) -> float:
        return self.p.decision_interval_s

    def start(self, now_s: float, size: int) -> None:
        """A group that has been at `size` so far (history for the stabilization)."""
        self._raw.append((now_s, size))
        self._sizes.append((now_s, size))

    def decide(self, now_s: float, current: int, members: Sequence[Member]) -> int:
        p = self.p
        raw = min(max(mig_raw_recommendation(members, p, current), p.min_replicas), p.max_replicas)
        self._raw.append((now_s, raw))
        while self._raw[0][0] <= now_s - p.stabilization_s and len(self._raw) > 1:
            self._raw.popleft()
        size = max(r for _, r in self._raw)
        self._sizes.append((now_s, current))
        while self._sizes[0][0] <= now_s - p.scale_in_window_s:
            self._sizes.popleft()
        if size < current:
            size = max(size, max(s for _, s in self._sizes) - p.max_scaled_in_replicas)
        size = min(max(size, p.min_replicas), p.max_replicas)
        self._sizes.append((now_s, size))
        return size


class PolicyType(StrEnum):
    PODS = "Pods"
    PERCENT = "Percent"


@dataclass(frozen=True, slots=True)
class ScalingPolicy:
    type: PolicyType
    value: int
    period_s: float


@dataclass(frozen=True, slots=True)
class HpaParams:
    """Defaults are deploy/gke/hpa.yaml's (min 1, max 20, its behavior) and the HPA's
    own (tolerance 0.1, 15 s sync)."""

    target: float
    min_replicas: int = 1
    max_replicas: int = 20
    tolerance: float = 0.1
    sync_period_s: float = 15.0
    up_window_s: float = 0.0
    down_window_s: float = 600.0
    up_policies: tuple[ScalingPolicy, ...] = (ScalingPolicy(PolicyType.PODS, 2, 60.0),)
    down_policies: tuple[ScalingPolicy, ...] = (ScalingPolicy(PolicyType.PODS, 1, 120.0),)


def hpa_replicas(current: int, members: Sequence[Member], target: float, tolerance: float) -> int | None:
    """calcPlainMetricReplicas; None when no pod has a point (the HPA then does nothing)."""
    values = [m.value for m in members if not m.pending and m.value is not None]
    missing = sum(1 for m in members if not m.pending and m.value is None)
    ignored = sum(1 for m in members if m.pending)
    if not values:
        return None
    ratio = sum(values) / len(values) / target
    rebalance_ignored = ignored > 0 and ratio > 1.0
    if not rebalance_ignored and missing == 0:
        if abs(1.0 - ratio) <= tolerance:
            return current
        return _ceil(ratio * len(values))
    filled = list(values)
    if missing:
        filled += [target if ratio < 1.0 else 0.0] * missing
    if rebalance_ignored:
        filled += [0.0] * ignored
    new_ratio = sum(filled) / len(filled) / target
    if abs(1.0 - new_ratio) <= tolerance or (ratio < 1.0 < new_ratio) or (ratio > 1.0 > new_ratio):
        return current
    return _ceil(new_ratio * len(filled))


class Hpa:
    def __init__(self, params: HpaParams) -> None:
        self.p = params
        self._recs: deque[tuple[float, int]] = deque()
        self._up_events: deque[tuple[float, int]] = deque()
        self._down_events: deque[tuple[float, int]] = deque()

    @property
    def interval_s(self) -> float:
        return self.p.sync_period_s

    def start(self, now_s: float, size: int) -> None:
        """A target that has been at `size` so far (history for the stabilization)."""
        self._recs.append((now_s, size))

    def decide(self, now_s: float, current: int, members: Sequence[Member]) -> int:
        desired = hpa_replicas(current, members, self.p.target, self.p.tolerance)
        if desired is None:
            return current
        size = self._rate_limited(now_s, current, self._stabilized(now_s, current, desired))
        if size > current:
            self._up_events.append((now_s, size - current))
        elif size < current:
            self._down_events.append((now_s, current - size))
        return size

    def _stabilized(self, now_s: float, current: int, desired: int) -> int:
        keep_s = max(self.p.up_window_s, self.p.down_window_s)
        while self._recs and self._recs[0][0] < now_s - keep_s:
            self._recs.popleft()
        up = min([desired] + [r for t, r in self._recs if t > now_s - self.p.up_window_s])
        down = max([desired] + [r for t, r in self._recs if t > now_s - self.p.down_window_s])
        self._recs.append((now_s, desired))
        return min(max(current, up), down)

    def _changed_in(self, events: deque[tuple[float, int]], now_s: float, period_s: float) -> int:
        return sum(change for t, change in events if t > now_s - period_s)

    def _period_start(self, now_s: float, current: int, period_s: float) -> int:
        return current - self._changed_in(self._up_events, now_s, period_s) + self._changed_in(self._down_events, now_s, period_s)

    def _rate_limited(self, now_s: float, current: int, desired: int) -> int:
        p = self.p
        if desired > current:
            limits = []
            for policy in p.up_policies:
                start = self._period_start(now_s, current, policy.period_s)
                limits.append(start + policy.value if policy.type is PolicyType.PODS else math.ceil(start * (1 + policy.value / 100)))
            return min(desired, p.max_replicas, max(max(limits), current))
        if desired < current:
            limits = []
            for policy in p.down_policies:
                start = self._period_start(now_s, current, policy.period_s)
                limits.append(start - policy.value if policy.type is PolicyType.PODS else int(start * (1 - policy.value / 100)))
            return max(desired, p.min_replicas, min(min(limits), current))
        return min(max(desired, p.min_replicas), p.max_replicas)
