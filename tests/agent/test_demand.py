"""The demand gauge (agent/demand.py): the formula (self-calibrated terms and the hand
overrides), its missing and stale inputs, and what every autoscaling series carries in
each lifecycle state."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest

from agent.demand import (
    DemandGauge,
    DemandTargets,
    NodeLoad,
    Series,
    autoscaling_values,
    next_held,
    node_demand,
)
from state_machine import State

# The hand targets (overrides): the formula the gauge had before it calibrated itself.
TARGETS = DemandTargets(queue_per_node=10.0, kv_usage_ratio=0.5, ttft_p95_s=2.0, max_demand=3.0)


@pytest.mark.parametrize(
    ("waiting", "kv", "ttft_s", "stale", "value", "dominant"),
    [
        (5.0, None, None, False, 0.5, "queue"),
        (None, 0.4, None, False, 0.8, "kv_cache"),
        (None, None, 3.0, False, 1.5, "ttft"),
        (5.0, 0.6, 1.0, False, 1.2, "kv_cache"),  # the term furthest over its target wins
        (12.0, 0.5, 2.0, False, 1.2, "queue"),
        (0.0, 0.0, None, False, 0.0, "queue"),  # idle; a tie goes to the first term
        (100.0, 1.0, 40.0, False, 3.0, "ttft"),  # a backlog is capped at max_demand
        (None, None, None, False, None, "none"),  # nothing known: no value
        (None, None, None, True, 1.0, "stale"),  # a hung vLLM counts as one full node
        (1.0, 0.1, 0.5, True, 1.0, "stale"),  # held low values cannot show spare capacity
        (30.0, None, None, True, 3.0, "queue"),  # held high values stand
        (math.nan, 0.4, None, False, 0.8, "kv_cache"),  # a broken input is left out, not taken as 0
        (-3.0, None, math.inf, False, None, "none"),
    ],
)
def test_with_hand_targets_demand_is_the_term_furthest_over_its_target(waiting, kv, ttft_s, stale, value, dominant) -> None:
    result = node_demand(waiting, kv, ttft_s, TARGETS, stale=stale)
    assert result.dominant == dominant
    if value is None:
        assert result.value is None
    else:
        assert result.value == pytest.approx(value)


def test_without_a_cap_the_backlog_is_reported_whole() -> None:
    targets = DemandTargets(queue_per_node=10.0, kv_usage_ratio=0.5, ttft_p95_s=2.0, max_demand=None)
    assert node_demand(250.0, 1.0, None, targets).value == pytest.approx(25.0)


@pytest.mark.parametrize(
    ("state", "held", "value", "dominant"),
    [
        (State.INIT, 2.0, 0.0, "warming"),
        (State.WARMING, 2.0, 0.0, "warming"),
        (State.DRAINING, 1.7, 1.7, "held"),
        (State.DRAINING, None, 0.0, "held"),  # drained before it ever served
        (State.TERMINATED, 0.4, 0.4, "held"),
    ],
)
def test_demand_outside_ready_follows_the_lifecycle_rule(state, held, value, dominant) -> None:
    result = node_demand(50.0, 1.0, 9.0, TARGETS, state=state, held=held)
    assert (result.value, result.dominant) == (pytest.approx(value), dominant)


@pytest.mark.parametrize(
    "field",
    ["queue_per_node", "kv_usage_ratio", "ttft_p95_s", "max_demand", "utilization_target", "max_num_seqs", "iteration_floor_s"],
)
@pytest.mark.parametrize("bad", [0, -1.0, math.nan, math.inf])
def test_targets_reject_values_that_are_not_positive_and_finite(field, bad) -> None:
    with pytest.raises(ValueError, match=field):
        DemandTargets(**{field: bad})


def test_a_utilization_target_above_one_is_refused() -> None:
    with pytest.raises(ValueError, match="utilization_target"):
        DemandTargets(utilization_target=1.2)


DEFAULTS = DemandTargets()  # self-calibrated: no hand target


@pytest.mark.parametrize(
    ("waiting", "kv", "ttft_s", "utilization", "admissions", "value", "dominant"),
    [
        (0.0, 0.2, 0.3, 0.6, 10.0, 1.0, "utilization"),  # at its utilization target
        (0.0, 0.2, 0.3, 0.3, 10.0, 0.5, "utilization"),
        (10.0, 0.2, 0.3, 0.6, 10.0, 1.0, "queue"),  # 10 waiting at 10 starts/s: 1 s, half the 2 s SLO (ties: queue)
        (20.0, 0.9, 0.3, 0.9, 10.0, 2.0, "queue"),  # a backlog of 2 s
        (0.0, 0.95, 0.3, None, None, 0.15, "ttft"),  # KV alone is no term without a hand target
        (5.0, 0.2, None, None, None, None, "none"),  # waiting without a start rate says nothing
        (0.0, 0.1, 3.0, 0.2, 10.0, 1.5, "ttft"),  # the SLO missed: the outcome wins
        (200.0, 1.0, 40.0, 1.0, 10.0, 3.0, "queue"),  # capped
        (7.0, 0.1, None, None, 0.0, 3.0, "queue"),  # requests wait and none starts: a queue that does not drain
        (0.0, 0.1, None, None, 0.0, 0.0, "queue"),  # idle: nothing waits, nothing starts
    ],
)
def test_self_calibrated_demand(waiting, kv, ttft_s, utilization, admissions, value, dominant) -> None:
    result = node_demand(waiting, kv, ttft_s, DEFAULTS, utilization=utilization, admissions_per_s=admissions)
    assert result.dominant == dominant
    assert result.value == (None if value is None else pytest.approx(value))


def test_hand_targets_override_the_calibrated_queue_and_add_a_kv_term() -> None:
    hand = DemandTargets(queue_per_node=5.0, kv_usage_ratio=0.5)
    assert node_demand(10.0, 0.1, None, hand, utilization=0.3, admissions_per_s=100.0).terms["queue"] == pytest.approx(2.0)
    assert node_demand(0.0, 0.8, None, hand, utilization=0.3, admissions_per_s=100.0).terms["kv_cache"] == pytest.approx(1.6)
    assert "kv_cache" not in node_demand(0.0, 0.8, None, DEFAULTS, utilization=0.3, admissions_per_s=100.0).terms


READY_LOAD = NodeLoad(
    waiting=4.0, running=20.0, kv_cache_usage_ratio=0.3, ttft_p95_s=0.8, gpu_usage_percent=97.0, ttft_p50_s=0.3, ttft_p99_s=1.5
)
READY_VALUES = {
    Series.DEMAND: 0.6,
    Series.QUEUE_LENGTH: 4.0,
    Series.PENDING_REQUESTS: 24.0,
    Series.TTFT_P50_MS: 300.0,
    Series.TTFT_P95_MS: 800.0,
    Series.TTFT_P99_MS: 1500.0,
    Series.GPU_USAGE_PERCENT: 97.0,
}
ZEROS = dict.fromkeys(Series, 0.0)


@pytest.mark.parametrize(
    ("state", "load", "held", "expected"),
    [
        (State.READY, READY_LOAD, None, READY_VALUES),
        # READY with nothing read yet: neutral demand, zero load, GPU unknown
        (State.READY, NodeLoad(), None, {**ZEROS, Series.DEMAND: 1.0, Series.GPU_USAGE_PERCENT: None}),
        (State.WARMING, READY_LOAD, READY_VALUES, ZEROS),  # start-up GPU noise is not load
        (State.INIT, NodeLoad(), None, {**ZEROS, Series.GPU_USAGE_PERCENT: None}),
        (State.DRAINING, NodeLoad(waiting=0.0, running=1.0, kv_cache_usage_ratio=0.01), READY_VALUES, READY_VALUES),
        (State.TERMINATED, NodeLoad(), READY_VALUES, READY_VALUES),
        (State.DRAINING, READY_LOAD, None, ZEROS),  # never served: holds zero
    ],
)
def test_every_autoscaling_series_is_written_in_every_state(state, load, held, expected) -> None:
    values = autoscaling_values(state, load, TARGETS, held)
    assert set(values) == set(Series)
    for series, want in expected.items():
        assert values[series] == (None if want is None else pytest.approx(want)), series


def test_a_stale_reading_holds_its_values_and_floors_the_demand() -> None:
    values = autoscaling_values(State.READY, NodeLoad(waiting=1.0, running=3.0, kv_cache_usage_ratio=0.1, stale=True), TARGETS)
    assert values[Series.DEMAND] == 1.0
    assert values[Series.QUEUE_LENGTH] == 1.0
    assert values[Series.PENDING_REQUESTS] == 4.0


def test_the_exporter_holds_what_it_wrote_while_ready_through_the_drain() -> None:
    held: dict[Series, float | None] = {}
    rounds = [
        (State.WARMING, NodeLoad()),
        (State.READY, READY_LOAD),
        (State.DRAINING, NodeLoad(waiting=0.0, running=2.0, kv_cache_usage_ratio=0.02, ttft_p95_s=0.3)),
        (State.DRAINING, NodeLoad(waiting=0.0, running=0.0, kv_cache_usage_ratio=0.0)),
        (State.TERMINATED, NodeLoad()),
    ]
    written = []
    for state, load in rounds:
        values = autoscaling_values(state, load, TARGETS, held)
        held = next_held(state, values, held)
        written.append(values[Series.DEMAND])
    assert written == [0.0, pytest.approx(0.6), pytest.approx(0.6), pytest.approx(0.6), pytest.approx(0.6)]


def test_demand_gauge_warming_zero_ready_live_draining_held() -> None:
    from dataclasses import dataclass as _dc

    from agent.demand import DemandGauge

    @_dc(frozen=True)
    class V:
        requests_waiting: float
        requests_running: float
        kv_cache_usage_ratio: float | None
        ttft_s: dict

    gauge = DemandGauge(TARGETS)

    def values(state: State, vllm: V, gpu: float | None = 60.0) -> dict[Series, float | None]:
        return gauge.values(state, vllm, stale=False, gpu_usage_percent=gpu)

    busy = V(20, 8, 0.25, {"p50": 0.2, "p95": 1.0, "p99": 1.8})
    assert values(State.WARMING, busy) == dict.fromkeys(Series, 0.0)  # capacity on its way, not demand
    serving = values(State.READY, busy, gpu=91.0)
    assert serving[Series.DEMAND] == 2.0  # waiting 20 / 10 dominates
    assert (serving[Series.QUEUE_LENGTH], serving[Series.PENDING_REQUESTS], serving[Series.GPU_USAGE_PERCENT]) == (20, 28, 91.0)
    assert [serving[Series.TTFT_P50_MS], serving[Series.TTFT_P95_MS], serving[Series.TTFT_P99_MS]] == pytest.approx(
        [200, 1000, 1800]
    )
    emptying = V(0, 1, 0.01, {"p95": 0.1})
    assert values(State.DRAINING, emptying, gpu=5.0) == serving  # every series held from the last READY round
    assert values(State.READY, V(100, 8, 0.9, {"p95": 9.0}))[Series.DEMAND] == 3.0  # capped
    assert gauge.values(State.READY, None, stale=False, gpu_usage_percent=None)[Series.DEMAND] == 1.0  # nothing read: neutral


def test_a_view_never_moves_the_held_values() -> None:
    @dataclass(frozen=True)
    class Reading:
        requests_waiting: float
        requests_running: float = 0.0
        kv_cache_usage_ratio: float | None = None
        ttft_s: dict = field(default_factory=dict)

    gauge = DemandGauge(DemandTargets())
    gauge.values(State.READY, Reading(7), stale=False, gpu_usage_percent=None)  # the export round
    for _ in range(50):  # /status and /metrics while READY, with newer numbers
        gauge.view(State.READY, Reading(2), stale=False, gpu_usage_percent=None)
    held = gauge.values(State.DRAINING, Reading(0), stale=False, gpu_usage_percent=None)
    assert held[Series.QUEUE_LENGTH] == 7


def _reading(
    running: float,
    generation_tps: float,
    kv: float,
    *,
    waiting: float = 0.0,
    generated: float = 0.0,
    done: float = 0.0,
    itl_p50: float | None = None,
    prompt_tps: float = 0.0,
):
    from types import SimpleNamespace

    return SimpleNamespace(
        requests_waiting=waiting,
        requests_running=running,
        kv_cache_usage_ratio=kv,
        ttft_s={"p50": 0.1, "p95": 0.2, "p99": 0.3},
        tpot_s={"p50": itl_p50},
        generation_tokens_per_s=generation_tps,
        prompt_tokens_per_s=prompt_tps,
        generation_tokens_total=generated,
        requests_completed_total=done,
    )


def test_the_gauge_calibrates_itself_from_what_vllm_reports() -> None:
    from agent.demand import DemandGauge

    gauge = DemandGauge(DemandTargets())  # t0 unknown: bounded from above by the median inter-token latency
    first = gauge.values(
        State.READY, _reading(20, 1000.0, 0.1, generated=2e4, done=100, itl_p50=0.015), stale=False, gpu_usage_percent=None
    )
    # t_iter 20 ms, t0 <= 15 ms: utilization 1 - 0.9 * 15/20 = 0.325, over the 0.6 target
    assert first[Series.DEMAND] == pytest.approx(0.325 / 0.6)
    # 200 tokens a request, 1000 tokens/s: 5 starts/s; 10 waiting are 2 s of queue, the whole SLO
    queued = gauge.values(
        State.READY,
        _reading(20, 1000.0, 0.1, waiting=10, generated=4e4, done=200, itl_p50=0.015),
        stale=False,
        gpu_usage_percent=None,
    )
    assert queued[Series.DEMAND] == pytest.approx(2.0)
    # a held reading teaches nothing and cannot show spare capacity
    held = gauge.values(State.READY, _reading(1, 10.0, 0.0, itl_p50=0.001), stale=True, gpu_usage_percent=None)
    assert held[Series.DEMAND] == 1.0 and gauge.floor.floor_s == pytest.approx(0.015)


def test_a_configured_iteration_floor_replaces_the_learning() -> None:
    from agent.demand import DemandGauge

    gauge = DemandGauge(DemandTargets(iteration_floor_s=0.010))
    values = gauge.values(State.READY, _reading(40, 1000.0, 0.2, itl_p50=0.001), stale=False, gpu_usage_percent=None)
    assert values[Series.DEMAND] == pytest.approx((1 - 0.8 * 0.010 / 0.040) / 0.6)
