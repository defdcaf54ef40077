"""How loaded a vLLM node is, from what vLLM reports (agent/capacity.py): the engine
utilization formula, the learned iteration floor t0 and the tokens a request makes."""

from __future__ import annotations

import math

import pytest

from agent.capacity import IterationFloor, OutputTokens, admissions_per_s, engine_utilization, iteration_s


@pytest.mark.parametrize(
    ("running", "generation_tps", "value"),
    [
        (50.0, 2000.0, 0.025),
        (1.0, 50.0, 0.02),
        (0.0, 100.0, None),
        (0.5, 100.0, None),
        (10.0, 0.0, None),
        (10.0, None, None),
        (math.nan, 1.0, None),
    ],
)
def test_the_mean_iteration_is_the_batch_over_the_token_rate(running, generation_tps, value) -> None:
    assert iteration_s(running, generation_tps) == (None if value is None else pytest.approx(value))


@pytest.mark.parametrize(
    ("running", "generation_tps", "kv", "floor_s", "max_seqs", "value"),
    [
        (1.0, 1000 / 13, 0.0, 0.013, None, 0.0),  # a lone sequence at t0: all the fixed cost is spare
        (64.0, 2000.0, 0.2, 0.013, None, 1 - 0.8 * 0.013 / 0.032),  # a fleet's typical node
        (200.0, 5000.0, 1.0, 0.013, None, 1.0),  # a full KV cache: saturated
        (100.0, 400.0, 0.5, 0.013, None, 1 - 0.5 * 0.013 / 0.25),  # prefill-bound: long iterations, little spare
        (128.0, 4000.0, 0.1, 0.013, 256, 1 - 0.5 * 0.013 / 0.032),  # the batch limit binds before the KV cache
        (64.0, 2000.0, 0.2, 0.050, None, 0.2),  # a floor above the iteration is clipped: KV usage is the least it can be
        (64.0, 2000.0, None, 0.013, None, None),  # no KV usage: unknown
        (64.0, 2000.0, 0.2, None, None, None),  # no floor yet: unknown
    ],
)
def test_engine_utilization(running, generation_tps, kv, floor_s, max_seqs, value) -> None:
    got = engine_utilization(running, generation_tps, kv, floor_s, max_seqs)
    assert got == (None if value is None else pytest.approx(value))


def test_utilization_is_linear_in_load_for_a_linear_iteration_cost() -> None:
    """Iteration t0 + m * batch, KV per sequence fixed: utilization = throughput / its maximum."""
    t0, m, full = 0.013, 0.0001, 300.0

    def throughput(batch: float) -> float:
        return batch / (t0 + m * batch)

    for batch in (10.0, 75.0, 150.0, 299.0):
        got = engine_utilization(batch, throughput(batch), batch / full, t0)
        assert got == pytest.approx(throughput(batch) / throughput(full), rel=1e-6)


def test_admissions_are_the_token_rate_over_the_tokens_a_request_makes() -> None:
    assert admissions_per_s(2000.0, 200.0) == pytest.approx(10.0)
    assert admissions_per_s(2000.0, None) is None and admissions_per_s(0.0, 200.0) is None


def test_the_floor_is_bounded_by_the_median_inter_token_latency_until_a_pair_pins_it() -> None:
    floor = IterationFloor()
    assert floor.observe(None, itl_p50_s=0.0175) == pytest.approx(0.0175)
    assert floor.observe(0.020, 0.05, 1000.0, itl_p50_s=0.0190) == pytest.approx(0.0175)  # the lowest bound stays
    assert floor.observe(0.020, 0.05, 1000.0, itl_p50_s=0.0150) == pytest.approx(0.0150)


def test_two_operating_points_pin_the_floor() -> None:
    """An engine with t0 = 13 ms, per-sequence cost m, KV per sequence 1/300 of the cache."""
    t0, m, full = 0.013, 0.0001, 300.0
    floor = IterationFloor(weight=1.0)  # no averaging: the points are exact here
    for batch in (20.0, 20.0, 40.0):
        tokens_per_s = batch / (t0 + m * batch)
        floor.observe(t0 + m * batch, batch / full, tokens_per_s, itl_p50_s=0.0175, running=batch)
    assert floor.floor_s == pytest.approx(t0, rel=1e-6)


def test_a_pair_lowers_the_bound_by_half_at_most_and_tiny_batches_teach_nothing() -> None:
    floor = IterationFloor(weight=1.0)
    floor.observe(0.004, 0.01, 100.0, itl_p50_s=0.0175, running=3)  # a batch of 3: too noisy to count
    assert floor.lightest is None and floor.floor_s == pytest.approx(0.0175)
    floor.observe(0.020, 0.02, 2400.0, running=20)
    floor.observe(0.200, 0.99, 3000.0, running=100)  # a pair that says t0 ~ 4 ms
    assert floor.floor_s == pytest.approx(0.0175 / 2)


def test_a_configured_floor_is_not_learned() -> None:
    floor = IterationFloor(0.01)
    assert floor.observe(0.002, 0.0, 100.0, itl_p50_s=0.001) == 0.01


def test_output_tokens_come_from_counter_deltas_or_the_lifetime() -> None:
    tokens = OutputTokens()
    assert tokens.observe(1000.0, 10.0) == pytest.approx(100.0)  # first reading: the lifetime
    assert tokens.observe(1000.0, 10.0) == pytest.approx(100.0)  # nothing finished: kept
    assert tokens.observe(4000.0, 20.0) == pytest.approx(300.0)  # the delta
    assert tokens.observe(500.0, 2.0) == pytest.approx(250.0)  # counters went back: a restart, its lifetime
    assert tokens.observe(None, 3.0) == pytest.approx(250.0)
