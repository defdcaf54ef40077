"""The agent of one simulated node, running the agent's own code: every scrape goes
through probes.vllm_metrics.summarize and VllmWindow, every export through
probes.vllm.make_reading and agent.demand.DemandGauge (the object the daemon holds).

The node model hands over the samples the prom_text parser would have produced from
vLLM's /metrics text, not the text itself: rendering and parsing ~90 lines per node
per scrape would be most of the run time and is measured elsewhere (bench_vllm_parse).

`StateRule` exists for the ablation in FLEET.md only: AGENT is agent.demand's rule;
LIVE writes the node's live values whatever its state (a draining node's emptying
queue, a warming node's zeros); TARGET_WHILE_WARMING is AGENT except that a warming
node writes "exactly at target" (demand 1.0, the policy's target for the others).
"""

from __future__ import annotations

from enum import StrEnum

from agent.demand import DemandGauge, DemandTargets, Series
from bench.fleet.node_model import NodeServer
from bench.fleet.policies import KV_USAGE, RUNNING
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
        warming_values: dict[str, float | None] | None = None,
    ) -> None:
        self.gauge, self.rule = DemandGauge(targets), rule
        self.warming_values = warming_values or {}
        self.slo_ttft_s, self.slo_tpot_s = slo_ttft_s, slo_tpot_s
        self.window = VllmWindow(window_s)
        self.scrape: VllmScrape | None = None

    def scrape_server(self, t_s: float, server: NodeServer) -> None:
        self.scrape = summarize(server.samples())
        self.window.add(t_s, self.scrape)

    def reading(self) -> VllmReading | None:
        if self.scrape is None:
            return None  # vLLM not listening yet (loading): nothing read
        stats = self.window.derive(self.slo_ttft_s, self.slo_tpot_s)
        return make_reading(self.scrape, stats, kv_capacity(self.scrape))

    def export(self, state: State, gpu_usage_percent: float | None) -> dict[str, float | None]:
        """The values written this round: the agent's autoscaling series (by Series value)
        and vLLM's own gauges as a Prometheus scrape would carry them (None: not listening)."""
        reading = self.reading()
        as_state = State.READY if self.rule is StateRule.LIVE and reading is not None else state
        values: dict[str, float | None] = {
            series.value: v
            for series, v in self.gauge.values(as_state, reading, stale=False, gpu_usage_percent=gpu_usage_percent).items()
        }
        if self.rule is StateRule.TARGET_WHILE_WARMING and state in _WARMING:
            values.update(self.warming_values)
        listening = reading is not None and state not in _WARMING
        values[KV_USAGE] = reading.kv_cache_usage_ratio if listening and reading is not None else None
        values[RUNNING] = reading.requests_running if listening and reading is not None else None
        return values


__all__ = ["NodeAgent", "Series", "StateRule"]
