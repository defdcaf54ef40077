"""bench_readyz's rule for which rounds count: only those where the driver's floor (the
bare app's p99) is low enough to see a stall; the rule reads the bare app alone, and a
run with no round that counts says so instead of printing a ratio."""

from __future__ import annotations

from bench.bench_readyz import TARGETS, Layout, report
from bench.loadgen import LoadResult


def result(p99_ms: float) -> LoadResult:
    latencies = (*[0.2] * 99, p99_ms)
    return LoadResult(100, 100, 100, 0, {}, 0.2, 0.2, p99_ms, p99_ms, p99_ms, 0.1, 0, latencies)


def layout(rounds: list[tuple[float, float, float]]) -> Layout:
    """Each round: the bare app's, the 1-engine agent's and the 4-engine agent's p99."""
    made = Layout("shared", max_floor_ms=5.0)
    for p99s in rounds:
        for target, p99 in zip(TARGETS, p99s, strict=True):
            made.rounds[target].append(result(p99))
    return made


def test_a_round_whose_floor_is_over_the_limit_is_shown_but_not_pooled() -> None:
    made = layout([(1.0, 1.0, 2.0), (40.0, 1.0, 400.0), (1.0, 1.0, 2.0)])
    assert made.counted == [0, 2]
    assert made.round_ratios("agent4") == [2.0, 2.0]
    assert made.pooled_p99("agent4") < 3.0  # the noisy round's 400 ms is not in the pool
    assert "2 of 3 rounds counted" in made.result("agent4")
    text = report([made], 2000, 2.5, 2)
    assert "| 2 (not counted: floor over 5 ms) |" in text
    assert "--max-floor-ms 5" in text


def test_the_rule_reads_the_bare_app_only() -> None:
    made = layout([(1.0, 90.0, 90.0), (6.0, 0.5, 0.5)])  # the agents' own figures never decide
    assert made.counted == [0]
    assert made.round_ratios("agent4") == [90.0]


def test_a_run_where_no_round_counts_reports_no_ratio() -> None:
    made = layout([(41.0, 30.0, 20.0), (53.0, 60.0, 90.0)])
    assert made.result("agent4") == "not measured: the driver's floor was over 5 ms in all 2 rounds"
    text = report([made], 2000, 2.5, 12)
    assert "No round counted" in text
    assert "counted rounds pooled (floor: bare p99 —) | not measured: the driver's floor was over 5 ms" in text
