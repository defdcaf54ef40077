"""The transition table, idempotent triggers, drain takeover and history."""

from __future__ import annotations

import pytest

from state_machine import DrainReason, Lifecycle, ResumeRefused, Source, State


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def ready_lifecycle(clock: FakeClock | None = None) -> Lifecycle:
    lifecycle = Lifecycle(clock=clock or FakeClock())
    assert lifecycle.start_warming()
    assert lifecycle.mark_ready("healthy")
    return lifecycle


def test_happy_path_records_time_reason_and_source() -> None:
    clock = FakeClock()
    lifecycle = Lifecycle(clock=clock)
    assert lifecycle.state is State.INIT
    lifecycle.start_warming()
    clock.t += 5
    lifecycle.mark_ready("2 in a row")
    assert lifecycle.state is State.READY
    assert [(t.from_state, t.to_state, t.reason, t.source) for t in lifecycle.history] == [
        (State.INIT, State.WARMING, "started", Source.AGENT),
        (State.WARMING, State.READY, "inference_healthy", Source.INFERENCE),
    ]
    assert lifecycle.history[1].at_mono == 1005.0
    assert lifecycle.transitions_total[("WARMING", "READY", "inference_healthy")] == 1


@pytest.mark.parametrize(
    "setup, trigger, allowed",
    [
        ("init", lambda lc: lc.mark_ready("x"), False),  # INIT cannot jump to READY
        ("init", lambda lc: lc.mark_lost("x"), False),
        ("warming", lambda lc: lc.mark_lost("x"), False),  # only READY can be lost
        ("warming", lambda lc: lc.start_warming(), False),
        ("ready", lambda lc: lc.mark_ready("x"), False),
        ("ready", lambda lc: lc.mark_lost("x"), True),
        ("ready", lambda lc: lc.terminate("x"), False),  # only a drain terminates
    ],
)
def test_transition_table_refuses_what_spec_does_not_allow(setup, trigger, allowed) -> None:
    lifecycle = Lifecycle(clock=FakeClock())
    if setup in ("warming", "ready"):
        lifecycle.start_warming()
    if setup == "ready":
        lifecycle.mark_ready("x")
    before = lifecycle.state
    assert trigger(lifecycle) is allowed
    if not allowed:
        assert lifecycle.state is before


@pytest.mark.parametrize("start", [State.INIT, State.WARMING, State.READY])
def test_any_live_state_can_drain(start: State) -> None:
    lifecycle = Lifecycle(clock=FakeClock())
    if start is not State.INIT:
        lifecycle.start_warming()
    if start is State.READY:
        lifecycle.mark_ready("x")
    assert lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=30)
    assert lifecycle.state is State.DRAINING


def test_second_preemption_notice_is_not_a_second_drain() -> None:
    lifecycle = ready_lifecycle()
    assert lifecycle.begin_drain(DrainReason.PREEMPTION, Source.METADATA, deadline_s=25, event_id="preempted")
    assert not lifecycle.begin_drain(DrainReason.PREEMPTION, Source.METADATA, deadline_s=25, event_id="preempted")
    assert not lifecycle.begin_drain(DrainReason.PREEMPTION, Source.METADATA, deadline_s=25)
    assert sum(1 for t in lifecycle.history if t.to_state is State.DRAINING) == 1


def test_preemption_takes_over_an_admin_drain_and_never_extends_the_deadline() -> None:
    clock = FakeClock()
    lifecycle = ready_lifecycle(clock)
    lifecycle.begin_drain(DrainReason.ADMIN, Source.ADMIN_API, deadline_s=10)
    assert lifecycle.begin_drain(DrainReason.PREEMPTION, Source.METADATA, deadline_s=25)
    assert lifecycle.drain is not None
    assert lifecycle.drain.reason is DrainReason.PREEMPTION
    assert lifecycle.drain.deadline_mono == clock.t + 10  # the earlier deadline stands
    assert lifecycle.drain.terminal
    with pytest.raises(ResumeRefused, match="preemption"):
        lifecycle.resume()


def test_lower_priority_trigger_during_a_preemption_drain_is_a_no_op() -> None:
    lifecycle = ready_lifecycle()
    lifecycle.begin_drain(DrainReason.PREEMPTION, Source.METADATA, deadline_s=25)
    for reason in (DrainReason.ADMIN, DrainReason.SIGNAL, DrainReason.MAINTENANCE, DrainReason.IDLE):
        assert not lifecycle.begin_drain(reason, Source.AGENT, deadline_s=300)
    assert lifecycle.drain.reason is DrainReason.PREEMPTION


def test_admin_drain_resumes_to_warming_and_is_drained_without_terminating() -> None:
    lifecycle = ready_lifecycle()
    lifecycle.begin_drain(DrainReason.ADMIN, Source.ADMIN_API, deadline_s=300)
    assert not lifecycle.terminate("empty")  # an admin drain never ends the node
    assert lifecycle.mark_drained()
    assert lifecycle.state is State.DRAINING and lifecycle.drain.drained
    assert lifecycle.reason == "admin_drained"
    lifecycle.resume()
    assert lifecycle.state is State.WARMING
    assert lifecycle.drain is None


def test_resume_refused_when_not_draining_or_terminated() -> None:
    lifecycle = ready_lifecycle()
    with pytest.raises(ResumeRefused, match="not draining"):
        lifecycle.resume()
    lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=1)
    assert lifecycle.terminate("done")
    with pytest.raises(ResumeRefused):
        lifecycle.resume()
    assert lifecycle.state is State.TERMINATED


def test_terminated_is_final() -> None:
    lifecycle = ready_lifecycle()
    lifecycle.begin_drain(DrainReason.PREEMPTION, Source.METADATA, deadline_s=25)
    lifecycle.terminate("empty")
    assert not lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=30)
    assert not lifecycle.start_warming()
    assert not lifecycle.mark_ready("x")
    assert lifecycle.state is State.TERMINATED


def test_history_is_bounded_and_listeners_see_every_transition() -> None:
    lifecycle = Lifecycle(clock=FakeClock(), history_len=5)
    seen = []
    lifecycle.subscribe(lambda t: seen.append(t.to_state))
    lifecycle.start_warming()
    for _ in range(10):
        lifecycle.mark_ready("x")
        lifecycle.mark_lost("y")
    assert len(lifecycle.history) == 5
    assert len(seen) == 21
    assert lifecycle.history[-1].seq == 21


def test_a_failing_listener_does_not_break_the_transition() -> None:
    lifecycle = Lifecycle(clock=FakeClock())
    calls = []

    def bad(_t):
        raise RuntimeError("listener bug")

    lifecycle.subscribe(bad)
    lifecycle.subscribe(lambda t: calls.append(t))
    assert lifecycle.start_warming()
    assert lifecycle.state is State.WARMING
    assert len(calls) == 1
