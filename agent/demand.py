"""The node demand gauge and the lifecycle rule for every autoscaling series. Pure.

`node_demand` says how loaded the node is relative to its targets, 1.0 being exactly
at target:

    demand = min(max_demand,
                 max(waiting / queue_per_node,
                     kv_cache_usage_ratio / kv_usage_ratio,
                     ttft_p95_s / ttft_p95_s target))

It is exported as `custom.googleapis.com/node/demand` (one label-free series per
node) and on /metrics. Both fleet autoscalers scale a per-node gauge the same way,
size = ceil(sum over nodes / target), so with a target of 1.0 the sum of the gauge
IS the number of nodes the fleet needs:

- MIG: `--custom-metric-utilization metric=custom.googleapis.com/node/demand,
  utilization-target=1,utilization-target-type=GAUGE` (on `gce_instance`).
- HPA: a Pods metric `custom.googleapis.com|node|demand` with
  `target: {type: AverageValue, averageValue: "1"}`.

Why these terms: the waiting queue is vLLM's direct "out of capacity" signal
(requests wait only when the batch is full); KV-cache usage rises with the batch
before anything waits, so it leads; p95 TTFT is the user-visible outcome and a
safety net for load the other two miss (long prompts, prefill-bound nodes). Why the
max: each term alone says "this node is past one of its limits", and the node is as
full as its fullest limit (GKE's guidance: scale on whichever of queue and KV cache is
further over its target). A term whose input is unknown is left out, never taken as 0.

Lifecycle rule (`autoscaling_values`), the same for every autoscaling series
(node/demand, vllm/queue_length, queue/pending_requests, vllm/ttft_ms,
gpu/usage_percent). vllm/ttft_ms is scaled on at p95; its p50 and p99 follow the same
rule, so one metric type never mixes held and live quantiles. The exporter writes
these values (agent/exporter/series.py); the other series (tps, tpot_ms,
kv_cache_usage_gb, memory_used_gb) stay plain facts.

- READY: the node's own values. A held (stale) vLLM reading keeps its last values
  and the demand is at least 1.0: a node whose vLLM hangs cannot show spare capacity.
  No input at all: demand 1.0 (neutral: counts as one node exactly at target).
- INIT, WARMING: zero load. Both autoscalers size the fleet as ceil(sum / target):
  a warming node carries no requests yet, and with 0 it adds nothing to the sum
  while still being counted as a node, i.e. as capacity on its way. Writing its
  target instead (1.0) would add one phantom node of demand per warming node, and
  the fleet would keep growing until the new nodes serve. (GPU utilization during a
  model load or CUDA-graph capture is start-up noise, not load: 0 as well.)
- DRAINING, TERMINATED: the values it wrote in its last READY round, held. A
  draining node's queue empties because new requests go elsewhere, not because
  demand fell: writing the emptying values (or 0) would drag the sum down while
  the same requests pile up on the other nodes, and writing nothing would make the
  series go missing (the HPA adapter then refuses to scale down). Holding keeps the
  fleet's sum where it was until the other nodes show the moved load. A node that
  never served holds zero.

Every series is written in every state (never None), except gpu/usage_percent
when the node reports no GPU utilization (no GPU, or MIG): unknown, not zero.
The exporter keeps `held` itself: `held = next_held(state, values, held)` each round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from state_machine import State

__all__ = [
    "TTFT_SERIES",
    "DemandGauge",
    "DemandResult",
    "DemandTargets",
    "NodeLoad",
    "Series",
    "autoscaling_values",
    "next_held",
    "node_demand",
]

_WARMING = frozenset({State.INIT, State.WARMING})
_LEAVING = frozenset({State.DRAINING, State.TERMINATED})


@dataclass(frozen=True, slots=True)
class DemandTargets:
    """Where each term reaches 1.0, and the most one node may claim. Defaults:

    - queue_per_node 10: at ~5-15 request starts per second per GPU (an 8B model,
      ~1.5k-token prompts, ~300-token answers) ten waiting requests are about a second
      of queueing, half a 2 s TTFT budget. Set it to what one node starts in about
      half your TTFT SLO. Requests wait only when the batch is full, so this term
      speaks once the node is saturated.
    - kv_usage_ratio 0.5: the early term, and the one that sets the headroom. A
      node's throughput flattens as its batch grows (TPOT rises with it), so KV
      usage climbs faster than load near saturation: at 0.5 a node runs at about
      70 % of what it finishes at a full cache, the headroom a reactive autoscaler
      needs to absorb the load that grows during the 5-10 minutes a new node takes
      to load its model. At 0.8 that headroom is under 10 % and the fleet runs at
      the edge (bench/FLEET.md, same cap: 0.8 kept 91-97 % of requests within the
      SLO on the sample traces, 0.5 kept 93-100 %, for 0-19 % more GPU-hours).
      Chosen with that simulation's node model: re-run it with yours.
    - ttft_p95_s 2.0: the default TTFT SLO (slo.ttft_ms = 2000); at 1.0 the node
      is missing its SLO for 5 % of its requests. Keep it equal to the SLO: the
      KV term is the early one, this one is the safety net (long prompts,
      prefill-bound nodes).
    - max_demand 3.0: the queue and TTFT terms grow with the backlog, not with the
      arrival rate: a node two minutes into an overload reports 20-200x, and both
      autoscalers, which size the fleet as the sum of the gauge, then jump to
      their maximum and hold it through their scale-in stabilization. Capped at 3,
      one decision at most triples the serving capacity; the next one, once the new
      nodes serve, adds more if needed (in the simulation: the same SLO share
      within 0.7 points for up to 42 % fewer GPU-hours). None disables the cap.
    """

    queue_per_node: float = 10.0
    kv_usage_ratio: float = 0.5
    ttft_p95_s: float = 2.0
    max_demand: float | None = 3.0

    def __post_init__(self) -> None:
        for name in ("queue_per_node", "kv_usage_ratio", "ttft_p95_s", "max_demand"):
            value = getattr(self, name)
            if name == "max_demand" and value is None:
                continue
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"DemandTargets.{name} must be a finite number > 0, got {value!r}")


@dataclass(frozen=True, slots=True)
class DemandResult:
    """`value` is None only when nothing is known (READY with no input at all).

    `dominant` names the term that set the value (queue, kv_cache, ttft) or the
    rule that did (none, stale, warming, held); `why` is one line for /status.
    """

    value: float | None
    dominant: str
    why: str
    terms: Mapping[str, float] = field(default_factory=dict)


def _known(value: float | None) -> float | None:
    # NaN or a negative reading is a broken input, not a load: leave the term out.
    if value is None or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def node_demand(
    waiting: float | None,
    kv_usage_ratio: float | None,
    ttft_p95_s: float | None,
    targets: DemandTargets,
    *,
    state: State = State.READY,
    stale: bool = False,
    held: float | None = None,
) -> DemandResult:
    """The demand of one node (rules in the module docstring).

    `stale`: the inputs come from a held vLLM reading (hung server, garbage scrape).
    `held`: the demand last written while READY, for DRAINING and TERMINATED.
    """
    if state in _WARMING:
        return DemandResult(0.0, "warming", f"{state.value}: no load yet, counted as capacity on its way")
    if state in _LEAVING:
        if held is None:
            return DemandResult(0.0, "held", f"{state.value}: never served, holds zero")
        return DemandResult(held, "held", f"{state.value}: holds its last READY demand {held:.3g}")
    terms: dict[str, float] = {}
    for name, value, target in (
        ("queue", waiting, targets.queue_per_node),
        ("kv_cache", kv_usage_ratio, targets.kv_usage_ratio),
        ("ttft", ttft_p95_s, targets.ttft_p95_s),
    ):
        known = _known(value)
        if known is not None:
            terms[name] = known / target
    if not terms:
        why = "no queue, KV-cache or TTFT input"
        return DemandResult(1.0 if stale else None, "stale" if stale else "none", why)
    dominant = max(terms, key=lambda name: terms[name])  # ties: the first listed (queue) wins
    value = terms[dominant]
    why = ", ".join(f"{name} {ratio:.3g}" for name, ratio in terms.items())
    if stale and value < 1.0:
        return DemandResult(1.0, "stale", f"held vLLM reading ({why}): at least 1.0 until it answers", terms)
    if targets.max_demand is not None and value > targets.max_demand:
        return DemandResult(targets.max_demand, dominant, f"{dominant} is furthest over its target ({why}), capped", terms)
    return DemandResult(value, dominant, f"{dominant} is furthest over its target ({why})", terms)


class Series(StrEnum):
    """The autoscaling series (metric types under custom.googleapis.com/)."""

    DEMAND = "node/demand"
    QUEUE_LENGTH = "vllm/queue_length"
    PENDING_REQUESTS = "queue/pending_requests"
    TTFT_P50_MS = "vllm/ttft_ms{quantile=p50}"
    TTFT_P95_MS = "vllm/ttft_ms{quantile=p95}"
    TTFT_P99_MS = "vllm/ttft_ms{quantile=p99}"
    GPU_USAGE_PERCENT = "gpu/usage_percent"


TTFT_SERIES = {"p50": Series.TTFT_P50_MS, "p95": Series.TTFT_P95_MS, "p99": Series.TTFT_P99_MS}


@dataclass(frozen=True, slots=True)
class NodeLoad:
    """What the node reads this round; None is unknown. `stale`: the vLLM values are held."""

    waiting: float | None = None
    running: float | None = None
    kv_cache_usage_ratio: float | None = None
    ttft_p95_s: float | None = None
    gpu_usage_percent: float | None = None
    stale: bool = False
    ttft_p50_s: float | None = None
    ttft_p99_s: float | None = None

    @classmethod
    def from_reading(cls, vllm: Any, *, gpu_usage_percent: float | None = None, stale: bool = False) -> NodeLoad:
        """From a probes.vllm VllmReading (None: vLLM not read, or refusing connections)."""
        if vllm is None:
            return cls(gpu_usage_percent=gpu_usage_percent)
        return cls(
            # Waiting for capacity (vLLM's num_requests_waiting_by_reason); requests deferred
            # for a KV transfer or a LoRA budget are not demand for more nodes.
            waiting=vllm.requests_waiting if getattr(vllm, "queue_waiting", None) is None else vllm.queue_waiting,
            running=vllm.requests_running,
            kv_cache_usage_ratio=vllm.kv_cache_usage_ratio,
            ttft_p95_s=vllm.ttft_s.get("p95"),
            gpu_usage_percent=gpu_usage_percent,
            stale=stale,
            ttft_p50_s=vllm.ttft_s.get("p50"),
            ttft_p99_s=vllm.ttft_s.get("p99"),
        )


def autoscaling_values(
    state: State,
    load: NodeLoad,
    targets: DemandTargets,
    held: Mapping[Series, float | None] | None = None,
) -> dict[Series, float | None]:
    """The value each autoscaling series carries this round (None: not written)."""
    held = held or {}
    demand = node_demand(
        load.waiting,
        load.kv_cache_usage_ratio,
        load.ttft_p95_s,
        targets,
        state=state,
        stale=load.stale,
        held=held.get(Series.DEMAND),
    )
    gpu_known = _known(load.gpu_usage_percent)
    if state is State.READY:
        waiting = _known(load.waiting) or 0.0
        # No request finished in the window: no latency pressure, 0.
        ttft_s = {"p50": load.ttft_p50_s, "p95": load.ttft_p95_s, "p99": load.ttft_p99_s}
        return {
            Series.DEMAND: 1.0 if demand.value is None else demand.value,
            Series.QUEUE_LENGTH: waiting,
            Series.PENDING_REQUESTS: waiting + (_known(load.running) or 0.0),
            **{series: (_known(ttft_s[q]) or 0.0) * 1000.0 for q, series in TTFT_SERIES.items()},
            Series.GPU_USAGE_PERCENT: gpu_known,
        }
    zero: dict[Series, float | None] = {series: 0.0 for series in Series}
    zero[Series.DEMAND] = demand.value
    if gpu_known is None:
        zero[Series.GPU_USAGE_PERCENT] = None
    if state in _WARMING:
        return zero
    return {series: held.get(series, zero[series]) if series is not Series.DEMAND else demand.value for series in Series}


def next_held(
    state: State, values: Mapping[Series, float | None], held: Mapping[Series, float | None] | None
) -> dict[Series, float | None]:
    """What to hold after a round: this round's values while READY, else what was held."""
    if state is State.READY:
        return dict(values)
    return dict(held or {})


class DemandGauge:
    """The autoscaling values the agent publishes this moment (node/demand on /metrics;
    every autoscaling series to Cloud Monitoring), with the values held from the last
    READY round. `vllm` is the VllmReading (None: not read, or refusing connections),
    `stale` True when it is the last good one of an unreadable vLLM. Every caller must
    pass the GPU utilization too: what a READY round holds is what DRAINING writes."""

    def __init__(self, targets: DemandTargets) -> None:
        self.targets = targets
        self._held: dict[Series, float | None] = {}

    def values(self, state: State, vllm: Any, *, stale: bool, gpu_usage_percent: float | None) -> dict[Series, float | None]:
        """This round's values, and they become what a later drain holds (a READY round).
        Only the round that writes them calls this: the export round."""
        values = self.view(state, vllm, stale=stale, gpu_usage_percent=gpu_usage_percent)
        self._held = next_held(state, values, self._held)
        return values

    def view(self, state: State, vllm: Any, *, stale: bool, gpu_usage_percent: float | None) -> dict[Series, float | None]:
        """The values for this moment, changing nothing: what /status and /metrics show.
        (A read that advanced the held values would change what a drain later exports.)"""
        load = NodeLoad.from_reading(vllm, gpu_usage_percent=gpu_usage_percent, stale=stale)
        return autoscaling_values(state, load, self.targets, self._held)
