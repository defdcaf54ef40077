"""The fleet: nodes through their lifecycle, a load balancer, Spot preemptions, an
autoscaler reading the series each node's agent exports, and the accounting.

A node is a MIG VM or a GKE pod. MIG: created by the autoscaler, PROVISIONING for the
VM boot, WARMING while vLLM loads the model, then READY. GKE: a new pod binds to a GPU
node left empty by an earlier pod (the cluster autoscaler keeps one for
scale_down_delay_s; image cached: only the model load) or waits for a new node (node
provisioning + image pull, Pending all along) before the model load. GPU-hours count
what bills: the VMs of a MIG, the GPU nodes of a GKE cluster (empty ones included).

A scale-in victim (not-yet-serving first, then the newest) stops getting requests after
drain_propagation_s, finishes its work (drain_timeout_s at most) and goes away. A Spot
preemption (preemptions_per_node_hour, Poisson) gives notice_s (30 s on GCE, ~15 s for
a GKE pod): the node drains until notice - safety margin and loses what is in flight
then; a MIG recreates the VM after replacement_delay_s, a ReplicaSet the pod at once.

The load balancer sends each request to a serving node (READY, or draining within the
propagation delay): evenly, or at random with per-node weights (Fidelity.lb_skew_cv);
with none, requests are rejected. Agents scrape vLLM every scrape_interval_s and export
every export_interval_s; the autoscaler reads the points through bench/fleet/monitoring.py.
"""

from __future__ import annotations

import bisect
import math
import random
from dataclasses import dataclass, field

from agent.demand import DemandTargets
from bench.fleet.agent_view import NodeAgent, StateRule
from bench.fleet.autoscalers import Hpa, HpaParams, Member, MigAutoscaler, MigParams
from bench.fleet.capacity import nodes_for, saturation
from bench.fleet.cluster import Host, HostPool, Kind
from bench.fleet.fidelity import Fidelity
from bench.fleet.monitoring import Points
from bench.fleet.node_model import EngineModes, NodeServer, ServingParams
from bench.fleet.policies import Policy
from state_machine import State

PROVISIONING = "PROVISIONING"


@dataclass(frozen=True, slots=True)
class FleetParams:
    dt_s: float = 5.0
    replacement_delay_s: float = 60.0
    preemptions_per_node_hour: float = 0.05
    mig_notice_s: float = 30.0
    gke_notice_s: float = 15.0
    safety_margin_s: float = 5.0
    drain_propagation_s: float = 5.0
    drain_timeout_s: float = 300.0
    scrape_interval_s: float = 30.0
    export_interval_s: float = 60.0
    window_s: float = 60.0
    slo_ttft_s: float = 2.0
    slo_tpot_s: float = 0.1
    initial_load_ratio: float = 0.6  # the fleet starts at the size that serves the first 10 minutes at 60 %
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
    host: Host | None = None
    phase: str = PROVISIONING
    member: bool = True
    preempted: bool = False
    accept_until_s: float = math.inf
    deadline_s: float = math.inf
    weight: float = 1.0
    points: Points = field(default_factory=Points)
    next_export_s: float = 0.0
    next_scrape_s: float = 0.0


@dataclass(slots=True)
class RunResult:
    trace: str
    kind: str
    policy: str
    rule: str
    fidelity: str = "realistic"
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
    kv_preemptions: float = 0.0
    # (t_s, rps, billed nodes, ready nodes, share of the interval's requests within the SLO)
    timeline: list[tuple[float, float, int, int, float]] = field(default_factory=list)

    @property
    def slo_share(self) -> float:
        return self.within_slo / self.arrived if self.arrived else 1.0

    @property
    def scale_events(self) -> int:
        return self.scale_ups + self.scale_downs


class Fleet:
    """One run: a request stream, a policy, an autoscaler kind; `run()` returns the RunResult."""

    def __init__(
        self,
        stream,
        policy: Policy,
        kind: Kind,
        *,
        seed: int = 1,
        fleet: FleetParams | None = None,
        serving: ServingParams | None = None,
        fidelity: Fidelity | None = None,
        demand_targets: DemandTargets | None = None,
        rule: StateRule = StateRule.AGENT,
        label: str | None = None,
    ) -> None:
        self.stream, self.policy, self.kind, self.rule = stream, policy, kind, rule
        self.f, self.fid = fleet or FleetParams(), fidelity or Fidelity()
        self.serving = serving or ServingParams()
        self.modes = EngineModes(prefill_cost=self.fid.prefill_cost, preemption=self.fid.kv_preemption)
        self.targets = demand_targets or DemandTargets(ttft_p95_s=self.f.slo_ttft_s)
        self.target = policy.target(kind.value)
        self.lb_rng = random.Random(f"lb:{stream.name}:{seed}")
        self.preempt_rng = random.Random(f"preemptions:{stream.name}:{seed}")
        limits = {"target": self.target, "min_replicas": self.f.min_nodes, "max_replicas": self.f.max_nodes}
        self.scaler = MigAutoscaler(MigParams(**limits)) if kind is Kind.MIG else Hpa(HpaParams(**limits))
        self.hosts = HostPool(self.fid) if kind is Kind.HPA else None
        self.nodes: list[Node] = []
        self.result = RunResult(stream.name, kind.value, policy.name, rule.value, label or "realistic")
        self.size = self._initial_size()
        self.scaler.start(0.0, self.size)
        for _ in range(self.size):
            self._create(0.0, warm=True)
        self._rr = 0
        self._seen = (0.0, 0.0)

    def _initial_size(self) -> int:
        """Sized for the first 10 minutes' own rate and request sizes (not default sizes)."""
        prompt, output = self.stream.mean_tokens(0.0, 600.0)
        prompt, output = prompt or self.serving.prompt_tokens, output or self.serving.output_tokens
        sat = saturation(self.serving, max(16, round(prompt, -1)), max(4, round(output, -1)), self.modes)
        rate = max(self.stream.rate_at(t) for t in (150.0, 300.0, 450.0))
        return min(max(nodes_for(rate, sat, self.f.initial_load_ratio), self.f.min_nodes), self.f.max_nodes)

    def run(self) -> RunResult:
        f, r = self.f, self.result
        steps = int(self.stream.duration_s // f.dt_s)
        decide_every = max(1, round(self.scaler.interval_s / f.dt_s))
        record_every = max(1, round(f.record_every_s / f.dt_s))
        for k in range(steps):
            t = k * f.dt_s
            self._serve(t, self.stream.arrivals(t, f.dt_s))
            self._lifecycle(t + f.dt_s)
            self._agents(t + f.dt_s)
            if (k + 1) % decide_every == 0:
                self._autoscale(t + f.dt_s)
            billed = self._billed(t + f.dt_s)
            r.gpu_hours += billed * f.dt_s / 3600.0
            r.peak_nodes = max(r.peak_nodes, billed)
            if (k + 1) % record_every == 0:
                self._record(t + f.dt_s, billed)
            if k % 720 == 0:
                self.nodes = [n for n in self.nodes if n.phase != State.TERMINATED]
        for node in self.nodes:
            self._collect(node)
        return r

    def _billed(self, now: float) -> int:
        if self.hosts is not None:
            return self.hosts.billed(now)
        return sum(1 for n in self.nodes if n.phase != State.TERMINATED)

    def _record(self, now: float, billed: int) -> None:
        r = self.result
        within = r.within_slo + sum(n.server.first_within_slo for n in self.nodes)
        seen = r.arrived
        share = (within - self._seen[0]) / (seen - self._seen[1]) if seen > self._seen[1] else 1.0
        self._seen = (within, seen)
        ready = sum(1 for n in self.nodes if n.phase == State.READY)
        r.timeline.append((now, self.stream.rate_at(now - self.f.record_every_s / 2), billed, ready, min(1.0, share)))

    # --- nodes ----------------------------------------------------------------------

    def _create(self, now_s: float, extra_delay_s: float = 0.0, warm: bool = False) -> None:
        f, fid = self.f, self.fid
        server = NodeServer(self.serving, f.slo_ttft_s, self.modes)
        agent = NodeAgent(
            self.targets,
            slo_ttft_s=f.slo_ttft_s,
            slo_tpot_s=f.slo_tpot_s,
            window_s=f.window_s,
            rule=self.rule,
            warming_values={self.policy.metric: self.target},
        )
        weight = self._lb_weight()
        if warm:  # the fleet starts serving
            node = Node(now_s - 3600.0, now_s, now_s, server, agent, phase=State.READY, weight=weight)
            node.host = self.hosts.bind_warm(now_s - 3600.0) if self.hosts is not None else None
        elif self.hosts is not None:
            host, warm_at = self.hosts.bind(now_s)
            node = Node(now_s, warm_at, warm_at + fid.gke_model_load_s, server, agent, host=host, weight=weight)
        else:
            warm_at = now_s + extra_delay_s + fid.mig_boot_s
            node = Node(now_s, warm_at, warm_at + fid.mig_model_load_s, server, agent, weight=weight)
        self.nodes.append(node)

    def _lb_weight(self) -> float:
        cv = self.fid.lb_skew_cv
        if cv <= 0:
            return 1.0
        sigma = math.sqrt(math.log(1 + cv * cv))
        return math.exp(self.lb_rng.gauss(-sigma * sigma / 2, sigma))

    def _serve(self, t: float, arrivals: list[tuple[float, int, int, int]]) -> None:
        accepting = [n for n in self.nodes if n.phase == State.READY or (n.phase == State.DRAINING and t < n.accept_until_s)]
        self.result.arrived += sum(a[3] for a in arrivals)
        share: dict[int, list] = {id(n): [] for n in accepting}
        if not accepting:
            self.result.rejected += sum(a[3] for a in arrivals)
        elif self.fid.lb_skew_cv <= 0:
            for i, a in enumerate(arrivals, start=self._rr):
                share[id(accepting[i % len(accepting)])].append(a)
            self._rr += len(arrivals)
        else:
            self._weighted(accepting, arrivals, share)
        for node in self.nodes:
            if node.phase in (State.READY, State.DRAINING):
                node.server.step(t, self.f.dt_s, share.get(id(node), []))

    def _weighted(self, accepting: list[Node], arrivals: list, share: dict[int, list]) -> None:
        cumulative, total = [], 0.0
        for n in accepting:
            total += n.weight
            cumulative.append(total)
        rand, last = self.lb_rng.random, len(accepting) - 1
        for a in arrivals:
            share[id(accepting[min(last, bisect.bisect_right(cumulative, rand() * total))])].append(a)

    def _lifecycle(self, now: float) -> None:
        p_preempt = 1.0 - math.exp(-self.f.preemptions_per_node_hour * self.f.dt_s / 3600.0)
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
                    self._end(node, now)
                elif now >= node.accept_until_s and node.server.in_flight == 0:
                    self._end(node, now)
        if self.hosts is not None:
            self.hosts.expire(now)

    def _preempt(self, node: Node, now: float) -> None:
        f = self.f
        self.result.preemptions += 1
        node.member, node.preempted = False, True
        notice = f.mig_notice_s if self.kind is Kind.MIG else f.gke_notice_s
        if node.host is not None:
            self.hosts.preempted(node.host, now + notice)
        if node.phase == State.WARMING:
            self._end(node, now)
        else:
            node.phase = State.DRAINING
            node.accept_until_s = now + f.drain_propagation_s
            node.deadline_s = now + notice - f.safety_margin_s
        self._create(now, extra_delay_s=f.replacement_delay_s if self.kind is Kind.MIG else 0.0)

    def _end(self, node: Node, now: float) -> None:
        node.phase, node.member = State.TERMINATED, False
        if node.host is not None:
            self.hosts.release(node.host, now)
        self._collect(node)

    def _collect(self, node: Node) -> None:
        r, s = self.result, node.server
        r.within_slo += s.first_within_slo
        r.late += s.first_late
        r.kv_preemptions += s.metrics.preemptions
        s.first_within_slo = s.first_late = 0.0
        s.metrics.preemptions = 0.0

    def _agents(self, now: float) -> None:
        f = self.f
        for node in self.nodes:
            if node.phase in (State.READY, State.DRAINING) and now >= node.next_scrape_s:
                node.agent.scrape_server(now, node.server)
                node.next_scrape_s = now + f.scrape_interval_s
            if node.phase in (State.WARMING, State.READY, State.DRAINING) and now >= node.next_export_s:
                gpu = node.server.gpu_utilization_percent() if node.phase != State.WARMING else 0.0
                node.points.add(now, node.agent.export(State(node.phase), gpu)[self.policy.metric])
                node.next_export_s = now + f.export_interval_s

    # --- the autoscaler -------------------------------------------------------------

    def _members(self, now: float) -> list[Member]:
        fid, seen = self.fid, []
        for n in self.nodes:
            if self.kind is Kind.MIG:
                if n.member or (n.preempted and n.phase == State.DRAINING):
                    seen.append(Member(n.points.mig_view(now, fid.mig_window_s, fid.mig_delay_s), now - n.created_s))
            elif n.member:
                seen.append(Member(n.points.hpa_view(now, fid.hpa_delay_s), now - n.created_s, pending=n.phase == PROVISIONING))
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
            self._create(now)
        if len(members) > size:
            order = {PROVISIONING: 0, State.WARMING: 1, State.READY: 2}
            victims = sorted(members, key=lambda n: (order[n.phase], -n.created_s))[: len(members) - size]
            for node in victims:
                self._scale_in(node, now)

    def _scale_in(self, node: Node, now: float) -> None:
        node.member = False
        if node.phase != State.READY:
            self._end(node, now)
            return
        node.phase = State.DRAINING
        node.accept_until_s = now + self.f.drain_propagation_s
        node.deadline_s = now + self.f.drain_timeout_s
