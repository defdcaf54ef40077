"""The shared probe runner: deadline, error counting, staleness, backoff, recovery."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest

from agent.core.backoff import backoff_s
from agent.core.snapshot import Snapshot
from probes.base import ProbeError, ProbeRunner


class ScriptedProbe:
    name = "scripted"
    interval_s = 0.01
    timeout_s = 0.1

    def __init__(self, script: list) -> None:
        self.script = list(script)
        self.calls = 0

    async def sample(self):
        self.calls += 1
        step = self.script.pop(0) if self.script else 1
        if step == "hang":
            await asyncio.sleep(10)
        if isinstance(step, Exception):
            raise step
        return step


async def test_failure_keeps_last_value_marks_it_stale_and_counts() -> None:
    snapshot = Snapshot()
    errors: Counter[str] = Counter()
    runner = ProbeRunner(ScriptedProbe([41, ProbeError("scrape too big", code="too_large")]), snapshot, errors)
    assert await runner.run_once()
    assert snapshot.value("scripted") == 41
    assert not await runner.run_once()
    reading = snapshot.get("scripted")
    assert reading.value == 41 and reading.is_stale(snapshot.now())
    assert reading.describe(snapshot.now())["error"] == "scrape too big"
    assert reading.failed_with("too_large")
    assert snapshot.value("scripted") is None  # fresh view hides the stale value
    assert errors["scripted"] == 1


async def test_hanging_probe_hits_its_deadline() -> None:
    snapshot = Snapshot()
    runner = ProbeRunner(ScriptedProbe(["hang"]), snapshot, Counter())
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    assert not await runner.run_once()
    assert loop.time() - t0 < 1.0
    assert snapshot.get("scripted").failed_with("timeout")


async def test_unexpected_exception_is_data_and_the_loop_goes_on() -> None:
    snapshot = Snapshot()
    errors: Counter[str] = Counter()
    probe = ScriptedProbe([RuntimeError("bug"), KeyError("x"), 7])
    runner = ProbeRunner(probe, snapshot, errors, backoff_cap_s=0.02)
    task = asyncio.create_task(runner.run())
    for _ in range(200):
        if snapshot.value("scripted") == 7:
            break
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert snapshot.value("scripted") == 7
    assert errors["scripted"] == 2
    assert runner.consecutive_failures == 0


async def test_listener_sees_values_and_errors_and_its_bugs_do_not_stop_the_probe() -> None:
    seen = []

    def listener(value, error):
        seen.append((value, error))
        raise RuntimeError("listener bug")

    runner = ProbeRunner(ScriptedProbe([1, ValueError("bad")]), Snapshot(), Counter(), on_sample=listener)
    assert await runner.run_once()
    assert not await runner.run_once()
    assert seen == [(1, None), (None, "ValueError: bad")]


@pytest.mark.parametrize("failures", [0, 1, 3, 10, 100])
def test_backoff_is_bounded_and_grows(failures: int) -> None:
    rng = random.Random(1)
    delays = [backoff_s(failures, 1.0, 30.0, rng) for _ in range(50)]
    assert all(1.0 <= d <= 30.0 for d in delays)
    if failures == 0:
        assert set(delays) == {1.0}
    if failures >= 10:
        assert max(delays) > 10


def test_stale_after_age() -> None:
    now = [0.0]
    snapshot = Snapshot(clock=lambda: now[0])
    snapshot.put("k", 1, stale_after_s=3)
    now[0] = 2.9
    assert not snapshot.get("k").is_stale(now[0])
    now[0] = 3.1
    assert snapshot.get("k").is_stale(now[0])
    assert snapshot.get("k").describe(now[0]) == {"age_s": 3.1, "stale": True, "error": None, "error_code": None}
