"""The fleet simulation (bench/fleet/): traces (rate CSVs, the Azure per-request format
and its transforms), the node model (its calibration, prefill cost, preemption) through
the agent's own metric code, the cluster and Cloud Monitoring views, determinism for a
seed, the autoscaler emulations on hand-computed cases of their documented algorithms,
and the quick study end to end."""

from __future__ import annotations

import random
import subprocess
import sys
from array import array
from dataclasses import astuple, replace
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
from bench.fleet.capacity import saturation
from bench.fleet.cluster import HostPool, Kind
from bench.fleet.fidelity import IDEAL, REALISTIC, Fidelity, with_ideal
from bench.fleet.monitoring import Points
from bench.fleet.node_model import EngineModes, NodeServer, ServingParams
from bench.fleet.policies import DEMAND
from bench.fleet.requests import RateStream, RequestStream, RequestTrace, compress, load_azure, scale, superpose, tile
from bench.fleet.sim import Fleet
from bench.fleet.trace import SAMPLE_NAMES, Trace, TraceError, load_trace, poisson
from state_machine import State

REPO = Path(__file__).resolve().parents[2]
AZURE = REPO.parent / "shared" / "traces" / "azure-llm-2023"
needs_azure = pytest.mark.skipif(
    not (AZURE / "AzureLLMInferenceTrace_conv.csv").is_file(), reason=f"the Azure LLM inference trace 2023 is not at {AZURE}"
)


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
    for k in range(24):  # 2 minutes at 30 requests/s, about three times what the node serves
        server.step(k * 5.0, 5.0, [(k * 5.0 + i / 30, 1500, 300, 1) for i in range(150)])
        agent.scrape_server((k + 1) * 5.0, server)
    reading = agent.reading()
    assert reading is not None
    assert reading.requests_waiting == pytest.approx(server.waiting_total) and reading.requests_waiting > 100
    assert reading.kv_cache_usage_ratio == pytest.approx(1.0, abs=0.02)
    assert reading.ttft_s["p95"] > 2.0
    assert server.first_late > 0
    values = agent.export(State.READY, server.gpu_utilization_percent())
    assert values[Series.DEMAND.value] == DemandTargets().max_demand
    assert values[Series.GPU_USAGE_PERCENT.value] == pytest.approx(100.0)


def test_the_node_model_matches_the_published_full_batch_throughput() -> None:
    """Lambda's vLLM v0.6.0 benchmark: Llama 3.1 8B, one H100, ShareGPT (~200 prompt / ~180
    output tokens), max-num-seqs 256, all requests at once: 8088 output tokens/s."""
    sat = saturation(replace(ServingParams(), max_num_seqs=256), 202, 179)
    assert sat.output_tokens_per_s == pytest.approx(8088, rel=0.10)
    assert sat.running == pytest.approx(256, rel=0.02)


@pytest.mark.parametrize(("prompt", "output"), [(1155, 211), (2048, 28), (1500, 300)])
def test_costly_prefill_serves_less_than_free_prefill(prompt: int, output: int) -> None:
    costly = saturation(ServingParams(), prompt, output, EngineModes(prefill_cost=True))
    free = saturation(ServingParams(), prompt, output, EngineModes(prefill_cost=False))
    assert costly.requests_per_s < free.requests_per_s
    assert 5.0 < costly.requests_per_s < 30.0  # an 8B model on one H100, ~1-2k-token prompts


@pytest.mark.parametrize("preemption", [True, False])
def test_vllm_preempts_only_when_decodes_outgrow_the_cache(preemption: bool) -> None:
    params = replace(ServingParams(), kv_capacity_tokens=60_000)
    server = NodeServer(params, 2.0, EngineModes(preemption=preemption))
    for k in range(60):
        server.step(k * 5.0, 5.0, [(k * 5.0, 1000, 2000, 1)] * 10)
        assert server.kv_used_tokens() <= params.kv_capacity_tokens * 1.01
    assert (server.metrics.preemptions > 0) is preemption


def test_every_request_gets_one_first_token_and_finishes() -> None:
    server = NodeServer(ServingParams(), 2.0)
    server.step(0.0, 5.0, [(i * 0.1, 500, 50, 1) for i in range(40)] + [(4.0, 800, 20, 3)])
    for k in range(1, 12):
        server.step(k * 5.0, 5.0, [])
    assert server.first_within_slo + server.first_late == 43
    assert server.metrics.stopped == 43 and server.in_flight == 0
    assert server.generation_tokens() == pytest.approx(40 * 50 + 3 * 20)


def step_stream(low_rps: float, high_rps: float, hours: float, seed: int = 1) -> RateStream:
    trace = Trace("step", (0.0, 1800.0, 1860.0, hours * 3600), (low_rps, low_rps, high_rps, high_rps))
    return RateStream(trace, (1500.0, 300.0), seed=seed)


def test_the_simulation_is_deterministic_for_a_seed() -> None:
    first, second = (Fleet(step_stream(5.0, 40.0, 1.0, 7), DEMAND, Kind.HPA, seed=7).run() for _ in range(2))
    assert astuple(first) == astuple(second)
    other = Fleet(step_stream(5.0, 40.0, 1.0, 8), DEMAND, Kind.HPA, seed=8).run()
    assert other.arrived != first.arrived


@pytest.mark.parametrize("kind", list(Kind))
def test_the_fleet_grows_when_the_load_jumps(kind: Kind) -> None:
    result = Fleet(step_stream(5.0, 40.0, 1.5), DEMAND, kind, seed=1).run()
    start_nodes = result.timeline[0][3]
    assert result.scale_ups >= 1
    assert result.timeline[-1][3] > start_nodes  # more nodes READY at the end than at the start
    assert 0.0 < result.slo_share <= 1.0 and result.gpu_hours > 0


def test_the_fleet_starts_sized_for_the_traces_own_requests() -> None:
    """Issue 17 (f): 20 requests/s of 4k-token prompts need more nodes than of 200-token ones."""

    def initial(prompt: int) -> int:
        times = array("d", (i / 20 for i in range(20 * 600)))
        trace = RequestTrace("t", times, array("l", [prompt] * len(times)), array("l", [100] * len(times)), 600.0)
        return Fleet(RequestStream(trace), DEMAND, Kind.MIG).size

    assert initial(4000) > initial(200) >= 1


def test_a_gke_pod_reuses_an_empty_node_and_empty_nodes_bill_until_removed() -> None:
    pool = HostPool(REALISTIC)
    host, containers_at = pool.bind(0.0)
    assert containers_at == REALISTIC.gke_node_provision_s + REALISTIC.gke_image_pull_s  # a new node, then the image
    pool.release(host, 1000.0)
    pool.expire(1000.0 + REALISTIC.scale_down_delay_s - 1)
    assert pool.billed(1599.0) == 1  # empty, still billed
    again, at = pool.bind(1599.0)
    assert again is host and at == 1599.0  # image cached: the model load starts at once
    pool.release(again, 2000.0)
    pool.expire(2000.0 + REALISTIC.scale_down_delay_s)
    assert pool.billed(2600.0) == 0


@pytest.mark.parametrize(
    ("points", "now", "window", "delay", "mig", "hpa"),
    [
        ([(0.0, 1.0), (60.0, 3.0)], 60.0, 0.0, 0.0, 3.0, 3.0),  # fresh: the latest point
        ([(0.0, 1.0), (60.0, 3.0)], 110.0, 120.0, 0.0, 2.0, 3.0),  # MIG: the mean over its window
        ([(0.0, 1.0), (60.0, 3.0)], 90.0, 0.0, 60.0, 1.0, 1.0),  # 60 s late: the point before
        ([(0.0, 1.0)], 400.0, 0.0, 60.0, 1.0, None),  # the adapter drops a point over 5 minutes old
        ([], 100.0, 120.0, 60.0, None, None),
    ],
)
def test_what_each_autoscaler_reads_of_a_nodes_points(points, now, window, delay, mig, hpa) -> None:
    series = Points()
    for t, v in points:
        series.add(t, v)
    assert series.mig_view(now, window, delay) == mig
    assert series.hpa_view(now, delay) == hpa


def test_one_knob_at_a_time_goes_back_to_ideal() -> None:
    fid = with_ideal(REALISTIC, ("prefill_cost", "lb_skew_cv"))
    assert (fid.prefill_cost, fid.lb_skew_cv) == (IDEAL.prefill_cost, IDEAL.lb_skew_cv)
    assert fid.hpa_delay_s == REALISTIC.hpa_delay_s and isinstance(fid, Fidelity)


# --- the Azure trace format ------------------------------------------------------------


def azure_csv(tmp_path: Path, rows: str) -> Path:
    path = tmp_path / "AzureLLMInferenceTrace_x.csv"
    path.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n" + rows)
    return path


def test_the_azure_format_is_read_as_is(tmp_path: Path) -> None:
    trace = load_azure(azure_csv(tmp_path, "2023-11-16 23:59:59.5000000,374,44\n2023-11-17 00:00:01.2500000,10,2"))
    assert list(trace.times_s) == pytest.approx([0.0, 1.75])  # across midnight
    assert (list(trace.prompt_tokens), list(trace.output_tokens)) == ([374, 10], [44, 2])


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ("2023-11-16 18:15:46.6,374\n", r":2: not TIMESTAMP"),
        ("2023-11-16 18:15:46.6,x,4\n2023-11-16 18:15:47.6,1,1", r":2: not TIMESTAMP"),
        ("2023-11-16 18:15:46.6,3,4\n2023-11-16 18:15:45.6,1,1", r":3: .*must not go backwards"),
        ("2023-11-16 18:15:46.6,-3,4\n2023-11-16 18:15:47.6,1,1", r":2: tokens must be >= 0"),
        ("2023-11-16 18:15:46.6,3,4", "at least two rows"),
    ],
)
def test_a_bad_azure_trace_is_refused_with_the_line_named(tmp_path: Path, rows: str, message: str) -> None:
    with pytest.raises(TraceError, match=message):
        load_azure(azure_csv(tmp_path, rows))


def _small() -> RequestTrace:
    times = array("d", [0.0, 10.0, 20.0, 30.0])
    return RequestTrace("s", times, array("l", [100, 200, 300, 400]), array("l", [1, 2, 3, 4]), 40.0)


def test_scale_tile_compress_and_superpose() -> None:
    small = _small()
    scaled = scale(small, 2.5, seed=3)
    assert 8 <= len(scaled) <= 12 and scaled.duration_s == 40.0 and sorted(scaled.times_s) == list(scaled.times_s)
    assert list(scale(small, 2.5, seed=3).times_s) == list(scaled.times_s)  # seeded
    tiled = tile(small, 3)
    assert (len(tiled), tiled.duration_s, tiled.times_s[4]) == (12, 120.0, 40.0)
    fast = compress(small, 4)
    assert (fast.duration_s, fast.times_s[-1], fast.rate_at(5.0, 10.0)) == (10.0, 7.5, pytest.approx(0.4))
    both = superpose("b", small, fast)
    assert len(both) == 8 and both.duration_s == 40.0


def test_a_request_stream_hands_out_each_steps_requests_once() -> None:
    stream = RequestStream(tile(_small(), 2))
    got = [stream.arrivals(t, 5.0) for t in range(0, 80, 5)]
    assert sum(len(g) for g in got) == 8
    assert got[2] == [(10.0, 200, 2, 1)]
    minute = RequestStream(_small(), sizes="minute").arrivals(0.0, 60.0)
    assert {(p, o) for _, p, o, _ in minute} == {(250, 2)}  # the minute's means (rounded)


@needs_azure
def test_the_shared_azure_trace_loads_with_its_provenance_counts() -> None:
    conv, code = (load_azure(AZURE / f"AzureLLMInferenceTrace_{n}.csv") for n in ("conv", "code"))
    assert (len(conv), len(code)) == (19366, 8819)  # PROVENANCE.md
    assert 3400 < conv.duration_s < 3600 and 3400 < code.duration_s < 3600
    assert conv.mean_tokens(0, 3600)[0] == pytest.approx(1155, rel=0.01)


# --- the study, end to end --------------------------------------------------------------


def test_the_quick_study_reports_every_run(tmp_path: Path) -> None:
    # No wall-clock assertion: its run time is a bench figure (bench/FLEET.md), not a test;
    # the timeout only stops a hang.
    out = tmp_path / "fleet.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.fleet_sim", "--quick", "--jobs", "2", "--write", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = out.read_text()
    traces = list(SAMPLE_NAMES) + (["azure_conv", "azure_code", "azure_mixed"] if AZURE.is_dir() else [])
    rows = [line for line in text.splitlines() if line.startswith(("| MIG |", "| HPA |"))]
    assert len(rows) == len(traces) * 2 * 6  # every policy on both autoscalers on every trace
    for trace in traces:
        assert f"#### {trace} (" in text and f"| {trace} | MIG |" in text and f"| {trace} | HPA |" in text
    gpu_hours = {(r.split("|")[1].strip(), r.split("|")[2].strip()): float(r.split("|")[3].strip(" *")) for r in rows[:12]}
    assert all(h > 0 for h in gpu_hours.values())
    # GPU utilization reads ~100 % on any busy vLLM node: it never needs fewer nodes than the gauge
    assert gpu_hours[("MIG", "gpu80")] >= gpu_hours[("MIG", "demand")]
    assert text.count("<!-- summary: fleet sim (") == 2


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
    assert (
        hpa.decide(15.0, 4, [Member(5.0, 1e3)] * 2 + [Member(None, 0.0, pending=True)] * 2) == 4
    )  # 2 already added in this period
    assert (
        hpa.decide(60.0, 4, [Member(5.0, 1e3)] * 2 + [Member(None, 0.0, pending=True)] * 2) == 6
    )  # the t=0 event left the period


def test_hpa_scale_down_is_limited_per_period_by_its_policy() -> None:
    hpa = Hpa(HpaParams(target=1.0, down_window_s=0.0))  # 1 pod per 120 s
    assert hpa.decide(0.0, 5, [Member(0.1, 1e3)] * 5) == 4
    assert hpa.decide(60.0, 4, [Member(0.1, 1e3)] * 4) == 4
    assert hpa.decide(120.0, 4, [Member(0.1, 1e3)] * 4) == 3
    assert hpa.decide(240.0, 3, [Member(0.1, 1e3)] * 3) == 2
    assert hpa.decide(360.0, 2, [Member(0.1, 1e3)] * 2) == 1  # min 1
    assert hpa.decide(480.0, 1, [Member(0.0, 1e3)]) == 1
