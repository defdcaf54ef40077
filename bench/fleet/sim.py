"""The fleet: nodes through their lifecycle, a load balancer, Spot preemptions, an
autoscaler reading the series each node's agent exports, and the accounting.

Lifecycle of a node (FleetParams, defaults in brackets): created by the autoscaler,
PROVISIONING for boot_s [90 s] (VM boot or pod scheduling and image start; no agent,
no series), WARMING for model_load_s [300 s] (the agent writes its series, vLLM loads
the model and refuses connections), then READY (the load balancer sends it requests).
A scale-in victim that serves drains: it stops getting requests after
drain_propagation_s [5 s], finishes its in-flight work and goes away (requests still
in flight at drain_timeout_s [300 s] are lost); victims are chosen as a ReplicaSet and
a MIG would, not-yet-serving nodes first, then the newest. A Spot preemption
(preemptions_per_node_hour [0.05] per running node, Poisson) gives a 30 s notice:
the node drains until notice - safety margin [25 s] and loses what is still in flight
then; its replacement (a MIG recreates the VM, a ReplicaSet the pod) is provisioned
after replacement_delay_s [60 s] plus boot_s.

The load balancer splits each step's arrivals evenly over the nodes that accept
(READY, or draining within the propagation delay); with none, requests are rejected.
Agents scrape their vLLM every scrape_interval_s [15 s] and export every
export_interval_s [60 s]; the autoscaler reads each node's latest exported point.
GPU-hours count every node from creation to its end (what the cloud bills).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from enum import StrEnum

from agent.demand import DemandTargets, Series
from bench.fleet.agent_view import NodeAgent, StateRule
from bench.fleet.autoscalers import Hpa, HpaParams, Member, MigAutoscaler, MigParams
from bench.fleet.node_model import NodeServer, ServingParams
from bench.fleet.trace import Trace, poisson
from state_machine import State

PROVISIONING = "PROVISIONING"


class Kind(StrEnum):
    MIG = "mig"
    HPA = "hpa"


@dataclass(frozen=True, slots=True)
class Policy:
    """Scale on `series` with a per-node `target` (MIG utilization target / HPA AverageValue)."""

    name: str
    series: Series
    target: float


@dataclass(frozen=True, slots=True)
class FleetParams:
    dt_s: float = 5.0
    boot_s: float = 90.0
    model_load_s: float = 300.0
    replacement_delay_s: float = 60.0
    preemptions_per_node_hour: float = 0.05
    preemption_notice_s: float = 30.0
    safety_margin_s: float = 5.0
    drain_propagation_s: float = 5.0
    drain_timeout_s: float = 300.0
    scrape_interval_s: float = 15.0
    export_interval_s: float = 60.0
    window_s: float = 60.0
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    initial_load_ratio: float = 0.6  # the fleet starts at the size that serves the first rate at 60 %
    min_nodes: int = 1
    max_nodes: int = 20
    record_every_s: float = 60.0


@dataclass(slots=True)
class Node:
    created_s: float
    warm_at_s: float
    ready_at_s: float
    server: NodeServer
    agent: NodeAgent
    phase: str = PROVISIONING
    member: bool = True
    preempted: bool = False
    accept_until_s: float = math.inf
    deadline_s: float = math.inf
    point: float | None = None
    next_export_s: float = 0.0
    next_scrape_s: float = 0.0


@dataclass(slots=True)
class RunResult:
    trace: str
    kind: str
    policy: str
    rule: str
    gpu_hours: float = 0.0
    arrived: float = 0.0
    within_slo: float = 0.0
    late: float = 0.0
    rejected: float = 0.0
    lost_preemption: float = 0.0
    lost_drain: float = 0.0
    preemptions: int = 0
    scale_ups: int = 0
    scale_downs: int = 0
    peak_nodes: int = 0
    timeline: list[tuple[float, float, int, int]] = field(default_factory=list)  # (t_s, rps, nodes, ready)

    @property
    def slo_share(self) -> float:
        return self.within_slo / self.arrived if self.arrived else 1.0

    @property
    def scale_events(self) -> int:
        return self.scale_ups + self.scale_downs


class Fleet:
    """One run: a trace, a policy, an autoscaler kind; `run()` returns the RunResult."""

    def __init__(self, trace: Trace, policy: Policy, kind: Kind, *, seed: int = 1, fleet: FleetParams | None = None,
                 serving: ServingParams | None = None, demand_targets: DemandTargets | None = None,
                 rule: StateRule = StateRule.AGENT) -> None:
        self.trace, self.policy, self.kind, self.rule = trace, policy, kind, rule
        self.f = fleet or FleetParams()
        self.serving = serving or ServingParams()
        self.targets = demand_targets or DemandTargets(ttft_p95_s=self.f.slo_ttft_s)
        self.arrivals_rng = random.Random(f"arrivals:{trace.name}:{seed}")
        self.preempt_rng = random.Random(f"preemptions:{trace.name}:{seed}")
        limits = {"target": policy.target, "min_replicas": self.f.min_nodes, "max_replicas": self.f.max_nodes}
        self.scaler = MigAutoscaler(MigParams(**limits)) if kind is Kind.MIG else Hpa(HpaParams(**limits))
        self.nodes: list[Node] = []
        first = trace.rate_at(0.0) / (self.f.initial_load_ratio * self.serving.max_rps())
        self.size = min(max(math.ceil(first), self.f.min_nodes), self.f.max_nodes)
        self.scaler.start(0.0, self.size)
        self.result = RunResult(trace.name, kind.value, policy.name, rule.value)
        for _ in range(self.size):
            self._create(0.0, extra_delay_s=0.0, warm=True)

    def run(self) -> RunResult:
        f, r = self.f, self.result
        steps = int(self.trace.duration_s // f.dt_s)
        decide_every = max(1, round(self.scaler.interval_s / f.dt_s))
        record_every = max(1, round(f.record_every_s / f.dt_s))
        for k in range(steps):
            t = k * f.dt_s
            rps = self.trace.rate_at(t + f.dt_s / 2)
            self._serve(t, poisson(self.arrivals_rng, rps * f.dt_s))
            self._lifecycle(t + f.dt_s)
            self._agents(t + f.dt_s)
            if (k + 1) % decide_every == 0:
                self._autoscale(t + f.dt_s)
            alive = [n for n in self.nodes if n.phase != State.TERMINATED]
            r.gpu_hours += len(alive) * f.dt_s / 3600.0
            r.peak_nodes = max(r.peak_nodes, len(alive))
            if k % record_every == 0:
                r.timeline.append((t, rps, len(alive), sum(1 for n in alive if n.phase == State.READY)))
            if k % 720 == 0:
                self.nodes = alive  # forget the gone ones (their counts are already kept)
        for node in self.nodes:
            self._collect(node)
        return r

    # --- one step -------------------------------------------------------------------

    def _create(self, now_s: float, extra_delay_s: float, warm: bool = False) -> None:
        f = self.f
        server = NodeServer(self.serving, f.slo_ttft_s)
        agent = NodeAgent(self.targets, slo_ttft_s=f.slo_ttft_s, slo_tpot_s=f.slo_tpot_s, window_s=f.window_s, rule=self.rule,
                           warming_values={self.policy.series: self.policy.target})
        if warm:  # the fleet starts serving
            node = Node(now_s - 3600.0, now_s, now_s, server, agent, phase=State.READY)
        else:
            warm_at = now_s + extra_delay_s + f.boot_s
            node = Node(now_s, warm_at, warm_at + f.model_load_s, server, agent)
        self.nodes.append(node)

    def _serve(self, t: float, arrivals: int) -> None:
        tokens = self.trace.tokens_at(t)
        accepting = [n for n in self.nodes if n.phase == State.READY or (n.phase == State.DRAINING and t < n.accept_until_s)]
        self.result.arrived += arrivals
        if not accepting:
            self.result.rejected += arrivals
            arrivals = 0
        share = arrivals / len(accepting) if accepting else 0.0
        taking = {id(n) for n in accepting}
        for node in self.nodes:
            if node.phase in (State.READY, State.DRAINING):
                if tokens is not None:
                    node.server.set_tokens(*tokens)
                node.server.step(t, self.f.dt_s, share if id(node) in taking else 0.0)

    def _lifecycle(self, now: float) -> None:
        f = self.f
        p_preempt = 1.0 - math.exp(-f.preemptions_per_node_hour * f.dt_s / 3600.0)
        for node in self.nodes:
            if node.phase == PROVISIONING and now >= node.warm_at_s:
                node.phase, node.next_export_s = State.WARMING, now
            if node.phase == State.WARMING and now >= node.ready_at_s:
                node.phase, node.next_scrape_s = State.READY, now
            if node.phase in (State.WARMING, State.READY) and self.preempt_rng.random() < p_preempt:
                self._preempt(node, now)
            if node.phase == State.DRAINING:
                if now >= node.deadline_s:
                    running, waiting = node.server.abort_all()
                    if node.preempted:
                        self.result.lost_preemption += running + waiting
                    else:
                        self.result.lost_drain += running + waiting
                    self._end(node)
                elif now >= node.accept_until_s and node.server.in_flight < 1e-6:
                    self._end(node)

    def _preempt(self, node: Node, now: float) -> None:
        f = self.f
        self.result.preemptions += 1
        node.member, node.preempted = False, True
        if node.phase == State.WARMING:
            self._end(node)
        else:
            node.phase = State.DRAINING
            node.accept_until_s = now + f.drain_propagation_s
            node.deadline_s = now + f.preemption_notice_s - f.safety_margin_s
        self._create(now, extra_delay_s=f.replacement_delay_s)

    def _end(self, node: Node) -> None:
        node.phase, node.member, node.point = State.TERMINATED, False, None
        self._collect(node)

    def _collect(self, node: Node) -> None:
        r, s = self.result, node.server
        r.within_slo += s.first_within_slo
        r.late += s.first_late
        s.first_within_slo = s.first_late = 0.0

    def _agents(self, now: float) -> None:
        f = self.f
        for node in self.nodes:
            if node.phase in (State.READY, State.DRAINING) and now >= node.next_scrape_s:
                node.agent.scrape_server(now, node.server)
                node.next_scrape_s = now + f.scrape_interval_s
            if node.phase in (State.WARMING, State.READY, State.DRAINING) and now >= node.next_export_s:
                gpu = node.server.gpu_utilization_percent()
                node.point = node.agent.export(State(node.phase), gpu)[self.policy.series]
                node.next_export_s = now + f.export_interval_s

    # --- the autoscaler -------------------------------------------------------------

    def _members(self, now: float) -> list[Member]:
        seen = []
        for n in self.nodes:
            counted = n.member or (self.kind is Kind.MIG and n.preempted and n.phase == State.DRAINING)
            if counted:
                seen.append(Member(n.point, now - n.created_s, pending=n.phase == PROVISIONING))
        return seen

    def _autoscale(self, now: float) -> None:
        size = self.scaler.decide(now, self.size, self._members(now))
        if size > self.size:
            self.result.scale_ups += 1
        elif size < self.size:
            self.result.scale_downs += 1
        self.size = size
        members = [n for n in self.nodes if n.member]
        for _ in range(size - len(members)):
            self._create(now, extra_delay_s=0.0)
        if len(members) > size:
            order = {PROVISIONING: 0, State.WARMING: 1, State.READY: 2}
            victims = sorted(members, key=lambda n: (order[n.phase], -n.created_s))[: len(members) - size]
            for node in victims:
                self._scale_in(node, now)

    def _scale_in(self, node: Node, now: float) -> None:
        node.member = False
        if node.phase != State.READY:
            self._end(node)
            return
        node.phase = State.DRAINING
        node.accept_until_s = now + self.f.drain_propagation_s
        node.deadline_s = now + self.f.drain_timeout_s
