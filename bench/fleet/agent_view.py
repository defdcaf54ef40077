"""The agent of one simulated node, running the agent's own code: every scrape goes
through probes.vllm_metrics.summarize and VllmWindow, every export through
probes.vllm.make_reading and agent.demand.autoscaling_values.

The node model hands over the samples the prom_text parser would have produced from
vLLM's /metrics text, not the text itself: rendering and parsing ~50 lines per node
per step would be most of the run time and is measured elsewhere (bench_vllm_parse).

`StateRule` exists for the ablation in FLEET.md only: AGENT is agent.demand's rule;
LIVE writes the node's live values whatever its state (a draining node's emptying
queue, a warming node's zeros); TARGET_WHILE_WARMING is AGENT except that a warming
node writes "exactly at target" (demand 1.0, the policy's target for the others).
"""

from __future__ import annotations

from enum import StrEnum

from agent.demand import DemandTargets, NodeLoad, Series, autoscaling_values, next_held
from bench.fleet.node_model import NodeServer
from probes.vllm import VllmReading, kv_capacity, make_reading
from probes.vllm_metrics import VllmScrape, VllmWindow, summarize
from state_machine import State


class StateRule(StrEnum):
    AGENT = "agent"
    LIVE = "live"
    TARGET_WHILE_WARMING = "target_while_warming"


_WARMING = (State.INIT, State.WARMING)


class NodeAgent:
    """Scrapes feed the sliding window; each export derives a reading and the series."""

    def __init__(
        self, targets: DemandTargets, *, slo_ttft_s: float, slo_tpot_s: float, window_s: float, rule: StateRule = StateRule.AGENT,
        warming_values: dict[Series, float | None] | None = None,
    ) -> None:
        self.targets, self.rule = targets, rule
        self.warming_values = warming_values or {}
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self.window = VllmWindow(window_s)
        self.scrape: VllmScrape | None = None
        self.held: dict[Series, float | None] = {}
        self.last_values: dict[Series, float | None] = {}

    def scrape_server(self, t_s: float, server: NodeServer) -> None:
        self.scrape = summarize(server.samples())
        self.window.add(t_s, self.scrape)

    def reading(self) -> VllmReading | None:
        if self.scrape is None:
            return None  # vLLM not listening yet (loading): nothing read
        stats = self.window.derive(self.slo_ttft_s, self.slo_tpot_s)
        return make_reading(self.scrape, stats, kv_capacity(self.scrape))

    def export(self, state: State, gpu_usage_percent: float | None) -> dict[Series, float | None]:
        """The values the exporter writes this round for the autoscaling series."""
        reading = self.reading()
        load = NodeLoad.from_reading(reading, gpu_usage_percent=gpu_usage_percent)
        if self.rule is StateRule.LIVE and state is not State.READY and reading is not None:
            values = autoscaling_values(State.READY, load, self.targets)
        else:
            values = autoscaling_values(state, load, self.targets, self.held)
        if self.rule is StateRule.TARGET_WHILE_WARMING and state in _WARMING:
            values = {**values, **self.warming_values}
        self.held = next_held(state, values, self.held)
        self.last_values = values
        return values
