"""Readiness thresholds and the idle rule."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from agent.config import DrainConfig, IdleConfig
from agent.core.snapshot import Snapshot
from agent.policy.idle import IdleWatchdog, is_idle
from agent.policy.readiness import ReadinessPolicy
from agent.policy.requests import DrainDesk
from probes.inference import HealthReading
from state_machine import DrainReason, Lifecycle, State

OK = HealthReading(ok=True, code="ok", detail="healthy", latency_ms=1.0)
DOWN = HealthReading(ok=False, code="refused", detail="connection refused", latency_ms=1.0)


def test_ready_after_n_successes_in_a_row_and_lost_after_m_failures() -> None:
    lifecycle = Lifecycle()
    lifecycle.start_warming()
    policy = ReadinessPolicy(lifecycle, ready_after=2, lost_after=3)
    policy.on_health(OK, None)
    policy.on_health(DOWN, None)  # breaks the streak
    policy.on_health(OK, None)
    assert lifecycle.state is State.WARMING
    policy.on_health(OK, None)
    assert lifecycle.state is State.READY
    policy.on_health(DOWN, None)
    policy.on_health(None, "probe crashed")
    assert lifecycle.state is State.READY
    policy.on_health(DOWN, None)
    assert lifecycle.state is State.WARMING
    assert "3 health checks failed in a row" in lifecycle.history[-1].detail


def test_health_does_not_move_a_draining_node() -> None:
    lifecycle = Lifecycle()
    lifecycle.start_warming()
    lifecycle.begin_drain(DrainReason.SIGNAL, lifecycle.history[0].source, deadline_s=30)
    policy = ReadinessPolicy(lifecycle, ready_after=1, lost_after=1)
    for _ in range(3):
        policy.on_health(OK, None)
    assert lifecycle.state is State.DRAINING


@dataclass(frozen=True)
class V:
    in_flight: float
    generation_tokens_per_s: float | None


@pytest.mark.parametrize(
    "reading, idle",
    [(None, False), (V(0, 0.0), True), (V(0, None), True), (V(1, 0.0), False), (V(0, 12.5), False)],
)
def test_idle_rule(reading, idle) -> None:
    assert is_idle(reading) is idle


def test_idle_watchdog_drains_after_the_configured_quiet_time() -> None:
    now = [100.0]
    lifecycle = Lifecycle()
    lifecycle.start_warming()
    lifecycle.mark_ready("x")
    snapshot = Snapshot(clock=lambda: now[0])
    watchdog = IdleWatchdog(DrainDesk(lifecycle), snapshot, IdleConfig(after_s=60), DrainConfig(), clock=lambda: now[0])
    snapshot.put("vllm", V(0, 0.0), stale_after_s=5)
    assert not watchdog.check()
    now[0] += 30
    snapshot.put("vllm", V(1, 3.0), stale_after_s=5)  # a request resets the clock
    assert not watchdog.check()
    snapshot.put("vllm", V(0, 0.0), stale_after_s=5)
    assert not watchdog.check()
    now[0] += 59
    snapshot.put("vllm", V(0, 0.0), stale_after_s=5)
    assert not watchdog.check()
    now[0] += 2
    snapshot.put("vllm", V(0, 0.0), stale_after_s=5)
    assert watchdog.check()
    assert lifecycle.drain.reason is DrainReason.IDLE


def test_stale_vllm_reading_is_not_idle() -> None:
    now = [0.0]
    lifecycle = Lifecycle()
    lifecycle.start_warming()
    lifecycle.mark_ready("x")
    snapshot = Snapshot(clock=lambda: now[0])
    watchdog = IdleWatchdog(DrainDesk(lifecycle), snapshot, IdleConfig(after_s=1), DrainConfig(), clock=lambda: now[0])
    snapshot.put("vllm", V(0, 0.0), stale_after_s=3)
    watchdog.check()
    now[0] += 10  # reading now stale: vLLM unreachable is not "idle"
    assert not watchdog.check()
    assert lifecycle.state is State.READY
