"""Spot preemption and host maintenance: the policy on a real Lifecycle (tables, no
loop). The whole watch over loopback: tests/probes/test_metadata_source.py."""

from __future__ import annotations

import time
from typing import Any

import pytest

from agent.config import DrainConfig, PreemptionConfig
from agent.policy.preemption import PreemptionPolicy, window_start_wall
from agent.policy.requests import DrainDesk
from probes.metadata import WatchTuning
from state_machine import DrainReason, Lifecycle, State

NOW = 1_800_000_000.0  # 2027-01-15T08:00:00Z
TERMINATE, MIGRATE = "TERMINATE_ON_HOST_MAINTENANCE", "MIGRATE_ON_HOST_MAINTENANCE"
FAST = WatchTuning(timeout_sec=1, backoff_base_s=0.01, backoff_cap_s=0.05, redetect_s=0.1, upcoming_poll_s=0.05,
                   identity_retry_s=0.01, preempted_backoff_base_s=0.01, preempted_backoff_cap_s=0.05)  # fmt: skip


def ready() -> Lifecycle:
    lifecycle = Lifecycle()
    lifecycle.start_warming()
    lifecycle.mark_ready("test")
    return lifecycle


def policy_for(lifecycle: Lifecycle, **preemption: Any) -> PreemptionPolicy:
    return PreemptionPolicy(DrainDesk(lifecycle), PreemptionConfig(**preemption), DrainConfig(timeout_s=300), wall=lambda: NOW)


def deadline_in_s(lifecycle: Lifecycle) -> float:
    assert lifecycle.drain is not None
    return lifecycle.drain.deadline_mono - time.monotonic()


def drains(lifecycle: Lifecycle) -> int:
    return sum(1 for t in lifecycle.history if t.to_state is State.DRAINING and t.from_state is not State.DRAINING)


# --- the policy ----------------------------------------------------------------------
def test_preemption_notice_drains_at_once_with_the_budget_minus_the_margin() -> None:
    lifecycle = ready()
    policy = policy_for(lifecycle)
    policy.on_preempted(False, "e0")
    assert lifecycle.state is State.READY
    policy.on_preempted(True, "e1")
    assert lifecycle.state is State.DRAINING and lifecycle.drain.reason is DrainReason.PREEMPTION
    assert 24.5 <= deadline_in_s(lifecycle) <= 25.0  # 30 s notice budget - 5 s safety margin
    event = {"at": "2027-01-15T08:00:00+00:00", "kind": "preempted", "value": "TRUE", "action": "drain"}
    assert policy.events[-1] == event


def test_preemption_deadline_follows_a_longer_notice_budget() -> None:
    lifecycle = ready()
    policy_for(lifecycle, notice_budget_s=120).on_preempted(True, "e1")
    assert 114.5 <= deadline_in_s(lifecycle) <= 115.0


def test_false_after_true_changes_nothing_preemption_is_terminal() -> None:
    lifecycle = ready()
    policy = policy_for(lifecycle)
    policy.on_preempted(True, "e1")
    policy.on_preempted(False, "e0")
    policy.on_maintenance_event("NONE", "m0")
    assert lifecycle.state is State.DRAINING and lifecycle.drain.reason is DrainReason.PREEMPTION
    assert policy.preempted and policy.events[-2]["action"] == "ignored: preemption is terminal"


def test_second_preemption_notice_is_not_a_second_drain() -> None:
    lifecycle = ready()
    policy = policy_for(lifecycle)
    policy.on_preempted(True, "e1")
    policy.on_preempted(True, "e1")
    policy.on_preempted(True, "e2")
    assert drains(lifecycle) == 1 and len(lifecycle.history) == 3  # warm, ready, drain
    assert [e["action"] for e in policy.events] == ["drain", "no change: already handled", "no change: already handled"]


def test_node_preempted_before_it_was_ready_never_becomes_ready() -> None:
    lifecycle = Lifecycle()
    lifecycle.start_warming()
    policy_for(lifecycle).on_preempted(True, "e1")
    assert not lifecycle.mark_ready("health passed")
    assert lifecycle.state is State.DRAINING


@pytest.mark.parametrize(
    "value, drain_on_migrate, drains_for",
    [(TERMINATE, False, DrainReason.MAINTENANCE), (MIGRATE, False, None), (MIGRATE, True, DrainReason.MAINTENANCE),
     ("NONE", False, None)],
)  # fmt: skip
def test_terminate_drains_for_maintenance_migrate_is_only_recorded(value, drain_on_migrate, drains_for) -> None:
    lifecycle = ready()
    policy = policy_for(lifecycle, drain_on_migrate=drain_on_migrate)
    policy.on_maintenance_event(value, "m1")
    assert (lifecycle.drain.reason if lifecycle.drain else None) is drains_for
    assert policy.maintenance_event == value and policy.events[-1]["value"] == value
    assert policy.describe()["maintenance_event"] == value


@pytest.mark.parametrize(
    "upcoming, budget_s, expected_s",
    [(None, 3600, 295), (None, 100, 95),  # no window known: min(drain timeout, budget) - margin
     ({"window_start_time": "2027-01-15T08:02:00Z"}, 3600, 115),  # window in 120 s
     ({"window_start_time": "2027-01-15T09:00:00+00:00"}, 3600, 295),  # window beyond the drain timeout
     ({"window_start_time": "2027-01-15T07:00:00Z"}, 3600, 0),  # already started: no time to lose
     ({"window_start_time": "not a time"}, 3600, 295)],
)  # fmt: skip
def test_maintenance_deadline_comes_from_the_window_start_when_known(upcoming, budget_s, expected_s) -> None:
    lifecycle = ready()
    policy = policy_for(lifecycle, maintenance_budget_s=budget_s)
    policy.on_upcoming_maintenance(upcoming, "u1")
    policy.on_maintenance_event(TERMINATE, "m1")
    assert expected_s - 0.5 <= deadline_in_s(lifecycle) <= expected_s


def test_none_after_terminate_never_undoes_the_maintenance_drain() -> None:
    lifecycle = ready()
    policy = policy_for(lifecycle)
    policy.on_maintenance_event(TERMINATE, "m1")
    policy.on_maintenance_event("NONE", "m0")
    policy.on_maintenance_event(TERMINATE, "m1")
    assert lifecycle.drain.reason is DrainReason.MAINTENANCE and drains(lifecycle) == 1


def test_preemption_takes_over_a_maintenance_drain_with_its_shorter_deadline() -> None:
    lifecycle = ready()
    policy = policy_for(lifecycle)
    policy.on_maintenance_event(TERMINATE, "m1")
    policy.on_preempted(True, "e1")
    assert lifecycle.drain.reason is DrainReason.PREEMPTION and deadline_in_s(lifecycle) <= 25.0


@pytest.mark.parametrize(
    "info, wall",
    [({"window_start_time": "2027-01-15T08:00:00Z"}, NOW), ({"windowStartTime": "2027-01-15T08:00:00.000Z"}, NOW),
     ({"window_start_time": "2027-01-15T08:00:00"}, NOW), ({"window_start_time": 5}, None), (None, None), ({}, None)],
)  # fmt: skip
def test_window_start_is_read_from_either_spelling_in_utc(info, wall) -> None:
    assert window_start_wall(info) == wall
