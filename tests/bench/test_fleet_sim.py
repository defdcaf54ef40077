"""The fleet simulation (bench/fleet/): traces, the node model through the agent's own
metric code, determinism for a seed, and the autoscaler emulations on hand-computed
cases of their documented algorithms."""

from __future__ import annotations

import random
from dataclasses import astuple
from pathlib import Path

import pytest

from agent.demand import DemandTargets, Series
from bench.fleet.agent_view import NodeAgent
from bench.fleet.autoscalers import (
    Hpa,
    HpaParams,
    Member,
    MigAutoscaler,
    MigParams,
    PolicyType,
    ScalingPolicy,
    hpa_replicas,
    mig_raw_recommendation,
)
from bench.fleet.node_model import NodeServer, ServingParams
from bench.fleet.sim import Fleet, Kind, Policy
from bench.fleet.trace import SAMPLE_NAMES, Trace, TraceError, load_trace, poisson
from state_machine import State

DEMAND = Policy("demand", Series.DEMAND, 1.0)
REPO = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "t.csv"
    path.write_text(text)
    return path


def test_a_trace_is_linear_between_rows_and_ends_at_the_last(tmp_path: Path) -> None:
    trace = load_trace(write(tmp_path, "# a comment\nt_s,rps,prompt_tokens,output_tokens\n0,10,1000,200\n100,30,2000,200\n"))
    assert (trace.name, trace.duration_s) == ("t", 100.0)
    assert trace.rate_at(25) == pytest.approx(15.0)
    assert trace.rate_at(500) == 30.0
    assert trace.tokens_at(50) == (pytest.approx(1500.0), pytest.approx(200.0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("time,rps\n0,1\n10,2\n", "header"),
        ("t_s,rps\n0,1\n10,x\n", r"t\.csv:3: rps='x'"),
        ("t_s,rps\n0,1\n0,2\n", "increase strictly"),
        ("t_s,rps\n5,1\n10,2\n", "start at 0"),
        ("t_s,rps\n0,1\n10,-2\n", ">= 0"),
        ("t_s,rps\n0,1\n", "two rows"),
    ],
)
def test_a_bad_trace_is_refused_with_the_line_named(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        load_trace(write(tmp_path, text))


def test_the_sample_traces_load_and_last_a_day() -> None:
    for name in SAMPLE_NAMES:
        assert load_trace(REPO / "bench" / "traces" / f"{name}.csv").duration_s == 24 * 3600


def test_poisson_draws_are_seeded_and_have_the_right_mean() -> None:
    for mean in (0.3, 7.0, 120.0):
        draws = [poisson(random.Random(f"x{i}"), mean) for i in range(2000)]
        assert sum(draws) / len(draws) == pytest.approx(mean, rel=0.08)
    assert poisson(random.Random(3), 12.0) == poisson(random.Random(3), 12.0)


def test_a_saturated_node_reads_as_over_target_through_the_agents_own_code() -> None:
    server = NodeServer(ServingParams(), slo_ttft_s=2.0)
    agent = NodeAgent(DemandTargets(), slo_ttft_s=2.0, slo_tpot_s=0.1, window_s=60.0)
    for k in range(24):  # 2 minutes at 30 requests/s, about twice what the node serves
        server.step(k * 5.0, 5.0, 150.0)
        agent.scrape_server((k + 1) * 5.0, server)
    reading = agent.reading()
    assert reading is not None
    assert reading.requests_waiting == pytest.approx(server.waiting_total) and reading.requests_waiting > 100
    assert reading.kv_cache_usage_ratio == pytest.approx(1.0)
    assert reading.ttft_s["p95"] > 2.0
    assert server.first_late > 0
    values = agent.export(State.READY, server.gpu_utilization_percent())
    assert values[Series.DEMAND] == DemandTargets().max_demand
    assert values[Series.GPU_USAGE_PERCENT] == pytest.approx(100.0)


def step_trace(low_rps: float, high_rps: float, hours: float) -> Trace:
    return Trace("step", (0.0, 1800.0, 1860.0, hours * 3600), (low_rps, low_rps, high_rps, high_rps))


def test_the_simulation_is_deterministic_for_a_seed() -> None:
    trace = step_trace(5.0, 40.0, 1.0)
    first, second = (Fleet(trace, DEMAND, Kind.HPA, seed=7).run() for _ in range(2))
    assert astuple(first) == astuple(second)
    other = Fleet(trace, DEMAND, Kind.HPA, seed=8).run()
    assert other.arrived != first.arrived


@pytest.mark.parametrize("kind", list(Kind))
def test_the_fleet_grows_when_the_load_jumps(kind: Kind) -> None:
    result = Fleet(step_trace(5.0, 40.0, 1.5), DEMAND, kind, seed=1).run()
    start_nodes = result.timeline[0][2]
    assert result.scale_ups >= 1
    assert result.timeline[-1][3] > start_nodes  # more nodes READY at the end than at the start
    assert 0.0 < result.slo_share <= 1.0 and result.gpu_hours > 0


# --- MIG autoscaler --------------------------------------------------------------------

MIG = MigParams(target=1.0, initialization_period_s=300.0)


def test_mig_sums_the_vms_past_their_initialization_period() -> None:
    members = [Member(1.2, 900.0), Member(0.9, 900.0), Member(None, 900.0), Member(5.0, 100.0)]
    assert mig_raw_recommendation(members, MIG, current=4) == 3  # ceil(1.2 + 0.9)
    assert mig_raw_recommendation([Member(2.0, 10.0)], MIG, current=4) == 4  # no data: no change


def test_mig_scales_out_at_once_and_in_only_after_the_stabilization_period() -> None:
    mig = MigAutoscaler(MIG)
    busy = [Member(1.0, 900.0)] * 4
    quiet = [Member(0.5, 900.0)] * 4  # needs 2
    assert mig.decide(0.0, 4, busy) == 4
    assert mig.decide(60.0, 4, quiet) == 4  # the peak of (now - 10 min, now] is still 4
    assert mig.decide(540.0, 4, quiet) == 4
    assert mig.decide(600.0, 4, quiet) == 3  # peak now 2, but scale-in control: 1 per 10 min from the peak size 4
    assert mig.decide(660.0, 3, [Member(0.5, 900.0)] * 3) == 3  # 4 is still the peak size of the last 10 min
    assert mig.decide(1200.0, 3, [Member(0.5, 900.0)] * 3) == 2
    assert mig.decide(1260.0, 2, [Member(2.6, 900.0)] * 2) == 6  # ceil(5.2): out at once


def test_mig_stays_within_min_and_max() -> None:
    mig = MigAutoscaler(MigParams(target=1.0, max_replicas=5, max_scaled_in_replicas=10, stabilization_s=0.0))
    assert mig.decide(0.0, 3, [Member(9.0, 1e4)] * 3) == 5
    assert mig.decide(60.0, 5, [Member(0.0, 1e4)] * 5) == 1


# --- HPA -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("current", "members", "expected"),
    [
        (4, [Member(v, 1e3) for v in (1.05, 1.0, 0.98, 1.02)], 4),  # within the 0.1 tolerance
        (3, [Member(2.0, 1e3)] * 3, 6),  # ceil(2.0 * 3)
        (4, [Member(0.2, 1e3)] * 4, 1),  # ceil(0.2 * 4)
        # missing pods count as the target on a scale-down: [0.2, 0.2, 1, 1] -> ceil(0.6 * 4)
        (4, [Member(0.2, 1e3)] * 2 + [Member(None, 1e3)] * 2, 3),
        # and as 0 on a scale-up: [3, 3, 0] -> ceil(2.0 * 3)
        (3, [Member(3.0, 1e3)] * 2 + [Member(None, 1e3)], 6),
        # pending pods count as 0 on a scale-up: [2, 2, 0, 0] -> ratio 1.0, within tolerance
        (4, [Member(2.0, 1e3)] * 2 + [Member(None, 0.0, pending=True)] * 2, 4),
        # the fill flips the direction (1.5 -> 0.5): no change
        (3, [Member(1.5, 1e3)] + [Member(None, 1e3)] * 2, 3),
    ],
)
def test_hpa_replica_calculation_matches_calc_plain_metric_replicas(current, members, expected) -> None:
    assert hpa_replicas(current, members, target=1.0, tolerance=0.1) == expected


def test_hpa_without_any_point_does_nothing() -> None:
    assert hpa_replicas(3, [Member(None, 1e3)] * 3, 1.0, 0.1) is None
    assert Hpa(HpaParams(target=1.0)).decide(0.0, 3, [Member(None, 1e3)] * 3) == 3


def test_hpa_scale_down_waits_for_its_stabilization_window() -> None:
    hpa = Hpa(HpaParams(target=1.0, down_window_s=300.0, down_policies=(ScalingPolicy(PolicyType.PERCENT, 100, 15.0),)))
    assert hpa.decide(0.0, 6, [Member(1.0, 1e3)] * 6) == 6
    assert hpa.decide(15.0, 6, [Member(0.3, 1e3)] * 6) == 6  # the highest recommendation of the window is 6
    assert hpa.decide(285.0, 6, [Member(0.3, 1e3)] * 6) == 6  # the t=0 one is inside (now - 300, now]
    assert hpa.decide(300.0, 6, [Member(0.3, 1e3)] * 6) == 2  # ceil(0.3 * 6)


def test_hpa_scale_up_is_limited_per_period_by_its_policy() -> None:
    hpa = Hpa(HpaParams(target=1.0))  # deploy/gke/hpa.yaml: 2 pods per 60 s
    assert hpa.decide(0.0, 2, [Member(5.0, 1e3)] * 2) == 4
    assert hpa.decide(15.0, 4, [Member(5.0, 1e3)] * 2 + [Member(None, 0.0, pending=True)] * 2) == 4  # 2 already added in this period
    assert hpa.decide(60.0, 4, [Member(5.0, 1e3)] * 2 + [Member(None, 0.0, pending=True)] * 2) == 6  # the t=0 event left the period


def test_hpa_scale_down_is_limited_per_period_by_its_policy() -> None:
    hpa = Hpa(HpaParams(target=1.0, down_window_s=0.0))  # 1 pod per 120 s
    assert hpa.decide(0.0, 5, [Member(0.1, 1e3)] * 5) == 4
    assert hpa.decide(60.0, 4, [Member(0.1, 1e3)] * 4) == 4
    assert hpa.decide(120.0, 4, [Member(0.1, 1e3)] * 4) == 3
    assert hpa.decide(240.0, 3, [Member(0.1, 1e3)] * 3) == 2
    assert hpa.decide(360.0, 2, [Member(0.1, 1e3)] * 2) == 1  # min 1
    assert hpa.decide(480.0, 1, [Member(0.0, 1e3)]) == 1
