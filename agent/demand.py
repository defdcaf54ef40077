"""The node demand gauge and the lifecycle rule for every autoscaling series. Pure.

`node_demand` says how loaded the node is relative to its targets, 1.0 being exactly
at target. It calibrates itself from what vLLM reports on the node (agent/capacity.py):

    demand = min(max_demand,
                 max(utilization / utilization_target,
                     waiting / (admissions_per_s * ttft_p95_s / 2),
                     ttft_p95 / ttft_p95_s))

- utilization: the share of its saturation throughput the node serves,
  1 - (t0 / t_iter) * (1 - kv_cache_usage), t_iter = running / generation tokens/s and
  t0 the engine's fixed cost per iteration, learned on the node (agent/capacity.py
  says how and why). It rises with the load before anything waits, whichever limit
  (prefill time, KV cache) the node will hit first. utilization_target 0.6 is the
  headroom a reactive autoscaler needs for the minutes a new node takes to serve.
- the queue as time: waiting / admissions per second is how long a new request waits
  before its prefill starts (Little's law); 1.0 when that is half the TTFT SLO.
- p95 TTFT over the SLO: the outcome itself, the safety net for what the others miss.

One default holds across node models: no term has a per-node constant. The hand
targets of `[autoscaling]` are overrides: `queue_per_node` replaces the queue term by
waiting / queue_per_node, `kv_usage_ratio` adds kv_cache_usage / kv_usage_ratio.

It is exported as `custom.googleapis.com/node/demand` (one label-free series per
node) and on /metrics. Both fleet autoscalers scale a per-node gauge the same way,
size = ceil(sum over nodes / target), so with a target of 1.0 the sum of the gauge
IS the number of nodes the fleet needs:

- MIG: `--custom-metric-utilization metric=custom.googleapis.com/node/demand,
  utilization-target=1,utilization-target-type=GAUGE` (on `gce_instance`).
- HPA: a Pods metric `custom.googleapis.com|node|demand` with
  `target: {type: AverageValue, averageValue: "1"}`.

Why the max: each term alone says "this node is past one of its limits", and the node
is as full as its fullest limit (GKE's guidance: scale on whichever of queue and KV
cache is further over its target). A term whose input is unknown is left out, never
taken as 0; with no utilization yet (first reading, idle node) the others decide.

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
`DemandGauge` keeps `held`: `hold(state, values)` after each round (agent/node_view.py's `NodeViews.round`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from agent.capacity import IterationFloor, OutputTokens, admissions_per_s, engine_utilization, iteration_s
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
    """Where each term reaches 1.0, and the most one node may claim (why these
    defaults: bench/FLEET.md, "How the defaults were chosen"):

    - utilization_target 0.6: demand 1.0 when the node serves 60 % of its saturation
      throughput, as the gauge estimates it: the headroom for the load that grows
      while a new node boots. A share of what the node itself can do, so it holds for
      any GPU, model and request size.
    - ttft_p95_s 2.0: the TTFT SLO (slo.ttft_ms); the queue term reaches 1.0 when a
      new request would wait half of it, the TTFT term when p95 reaches it.
    - max_demand 3.0: the queue and TTFT terms grow with the backlog, not with the
      arrival rate; capped, one autoscaler decision at most triples the serving
      capacity. None disables the cap.
    - Overrides, None by default (the gauge calibrates itself): queue_per_node (the
      queue term becomes waiting / queue_per_node), kv_usage_ratio (adds
      kv_cache_usage / kv_usage_ratio), max_num_seqs (vLLM's --max-num-seqs, when the
      batch limit binds before the KV cache), iteration_floor_s (t0 measured once,
      e.g. the TPOT of a lone request, instead of learned).
    """

    queue_per_node: float | None = None
    kv_usage_ratio: float | None = None
    ttft_p95_s: float = 2.0
    max_demand: float | None = 3.0
    utilization_target: float = 0.6
    max_num_seqs: int | None = None
    iteration_floor_s: float | None = None

    def __post_init__(self) -> None:
        optional = {"queue_per_node", "kv_usage_ratio", "max_demand", "max_num_seqs", "iteration_floor_s"}
        for name in (
            "queue_per_node",
            "kv_usage_ratio",
            "ttft_p95_s",
            "max_demand",
            "utilization_target",
            "max_num_seqs",
            "iteration_floor_s",
        ):
            value = getattr(self, name)
            if value is None and name in optional:
                continue
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"DemandTargets.{name} must be a finite number > 0, got {value!r}")
        if self.utilization_target > 1:
            raise ValueError(f"DemandTargets.utilization_target must be at most 1, got {self.utilization_target!r}")


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
    utilization: float | None = None,
    admissions_per_s: float | None = None,
) -> DemandResult:
    """The demand of one node (rules in the module docstring).

    `utilization` and `admissions_per_s` come from agent/capacity.py (DemandGauge
    keeps what they learn). `stale`: the inputs come from a held vLLM reading (hung
    server, garbage scrape). `held`: the demand last written while READY, for DRAINING
    and TERMINATED.
    """
    if state in _WARMING:
        return DemandResult(0.0, "warming", f"{state.value}: no load yet, counted as capacity on its way")
    if state in _LEAVING:
        if held is None:
            return DemandResult(0.0, "held", f"{state.value}: never served, holds zero")
        return DemandResult(held, "held", f"{state.value}: holds its last READY demand {held:.3g}")
    terms = _terms(waiting, kv_usage_ratio, ttft_p95_s, targets, utilization, admissions_per_s)
    if not terms:
        why = "no utilization, queue, KV-cache or TTFT input"
        return DemandResult(1.0 if stale else None, "stale" if stale else "none", why)
    dominant = max(terms, key=lambda name: terms[name])  # ties: the first listed wins
    value = terms[dominant]
    why = ", ".join(f"{name} {ratio:.3g}" for name, ratio in terms.items())
    if stale and value < 1.0:
        return DemandResult(1.0, "stale", f"held vLLM reading ({why}): at least 1.0 until it answers", terms)
    if targets.max_demand is not None and value > targets.max_demand:
        return DemandResult(targets.max_demand, dominant, f"{dominant} is furthest over its target ({why}), capped", terms)
    return DemandResult(value, dominant, f"{dominant} is furthest over its target ({why})", terms)


def _terms(
    waiting: float | None,
    kv: float | None,
    ttft_s: float | None,
    targets: DemandTargets,
    utilization: float | None,
    admissions_per_s: float | None,
) -> dict[str, float]:
    """Each known input over where it reaches 1.0 (queue first: it wins ties)."""
    waiting, kv, ttft_s, utilization = _known(waiting), _known(kv), _known(ttft_s), _known(utilization)
    terms: dict[str, float] = {}
    if waiting is not None:
        if targets.queue_per_node is not None:
            terms["queue"] = waiting / targets.queue_per_node
        elif (admissions := _known(admissions_per_s)) is not None:
            # No request starting at all while some wait: the queue does not drain.
            terms["queue"] = (
                waiting / (admissions * targets.ttft_p95_s / 2) if admissions > 0 else (targets.max_demand or 3.0) * (waiting > 0)
            )
    if utilization is not None:
        terms["utilization"] = utilization / targets.utilization_target
    if kv is not None and targets.kv_usage_ratio is not None:
        terms["kv_cache"] = kv / targets.kv_usage_ratio
    if ttft_s is not None:
        terms["ttft"] = ttft_s / targets.ttft_p95_s
    return terms


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
    generation_tokens_per_s: float | None = None
    prompt_tokens_per_s: float | None = None
    generation_tokens_total: float | None = None
    requests_completed_total: float | None = None
    tpot_p50_s: float | None = None

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
            # Readings from before these fields existed (and test doubles) carry none.
            generation_tokens_per_s=getattr(vllm, "generation_tokens_per_s", None),
            prompt_tokens_per_s=getattr(vllm, "prompt_tokens_per_s", None),
            generation_tokens_total=getattr(vllm, "generation_tokens_total", None),
            requests_completed_total=getattr(vllm, "requests_completed_total", None),
            tpot_p50_s=(getattr(vllm, "tpot_s", None) or {}).get("p50"),
        )


def autoscaling_values(
    state: State,
    load: NodeLoad,
    targets: DemandTargets,
    held: Mapping[Series, float | None] | None = None,
    *,
    utilization: float | None = None,
    admissions_per_s: float | None = None,
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
        utilization=utilization,
        admissions_per_s=admissions_per_s,
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
    READY round and what the node has learned about itself (agent/capacity.py: its
    lightest iteration, the tokens a request makes). `vllm` is the VllmReading (None:
    not read, or refusing connections), `stale` True when it is the last good one of an
    unreadable vLLM. Every caller must pass the GPU utilization too: what a READY round
    holds is what DRAINING writes."""

    def __init__(self, targets: DemandTargets) -> None:
        self.targets = targets
        self._held: dict[Series, float | None] = {}
        self.floor = IterationFloor(targets.iteration_floor_s)
        self.output_tokens = OutputTokens()

    def learn(self, vllm: Any, *, stale: bool = False) -> None:
        """What one new vLLM reading teaches the node about itself (its lightest
        iteration, the tokens a request makes). Once per reading: the daemon calls it as
        each scrape lands, so how often the node is read never changes what it learns."""
        if stale or vllm is None:  # a held reading teaches nothing new
            return
        load = NodeLoad.from_reading(vllm)
        tokens_per_s = (
            None if load.generation_tokens_per_s is None else load.generation_tokens_per_s + (load.prompt_tokens_per_s or 0.0)
        )
        self.floor.observe(
            iteration_s(load.running, load.generation_tokens_per_s),
            load.kv_cache_usage_ratio,
            tokens_per_s,
            load.tpot_p50_s,
            load.running,
        )
        self.output_tokens.observe(load.generation_tokens_total, load.requests_completed_total)

    def values(
        self, state: State, vllm: Any, *, stale: bool, gpu_usage_percent: float | None, learn: bool = True
    ) -> dict[Series, float | None]:
        """learn, view and hold in one call: this round's values, which become what a later
        drain holds (a READY round). The fleet simulation's round; the daemon does the
        three apart (learns on each scrape, holds on each round: agent/node_view.py)."""
        if learn:
            self.learn(vllm, stale=stale)
        values = self.view(state, vllm, stale=stale, gpu_usage_percent=gpu_usage_percent)
        self.hold(state, values)
        return values

    def hold(self, state: State, values: Mapping[Series, float | None]) -> None:
        """A round wrote `values` in `state`: a READY round's become what a drain holds."""
        self._held = next_held(state, values, self._held)

    def view(self, state: State, vllm: Any, *, stale: bool, gpu_usage_percent: float | None) -> dict[Series, float | None]:
        """The values for this moment, changing nothing: what /status and /metrics show.
        (A read that advanced the held values, or the learning, would change what the
        node later exports.)"""
        load = NodeLoad.from_reading(vllm, gpu_usage_percent=gpu_usage_percent, stale=stale)
        utilization = admissions = None
        if not stale:
            utilization = engine_utilization(
                load.running,
                load.generation_tokens_per_s,
                load.kv_cache_usage_ratio,
                self.floor.floor_s,
                self.targets.max_num_seqs,
            )
            admissions = admissions_per_s(load.generation_tokens_per_s, self.output_tokens.mean)
            if load.generation_tokens_per_s == 0:
                admissions = 0.0  # known: nothing is being made
        return autoscaling_values(state, load, self.targets, self._held, utilization=utilization, admissions_per_s=admissions)
