"""The drain task: propagation delay, settle, deadline, refused vs hung vLLM,
completed vs aborted, admin drains that stay drained, takeover and force.

The lifecycle, the snapshot and the drain share one injected clock; a test that
needs time to pass moves it (`Clock.advance`) and waits for the drain to have seen
the new time, instead of sleeping."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from agent.config import DrainConfig
from agent.core.snapshot import Snapshot
from agent.policy.drain import DrainController
from state_machine import DrainReason, Lifecycle, Source, State
from tests.harness import until


@dataclass(frozen=True)
class Vllm:
    in_flight: float
    requests_completed_total: float = 0.0
    requests_aborted_total: float = 0.0


class Clock:
    """Monotonic time a test can move forward."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset_s

    def advance(self, seconds: float) -> None:
        self.offset_s += seconds


class Node:
    """A lifecycle, a snapshot and a running DrainController. `vllm()` / `vllm_fails()`
    set what vLLM would answer now and record it as a probe reading; the drain's own
    fresh reads (`refresh`) record the same answer again, at the time they ask."""

    def __init__(self, **drain: float) -> None:
        self.clock = Clock()
        self.snapshot = Snapshot(clock=self.clock)
        self.lifecycle = Lifecycle(clock=self.clock)
        self.lifecycle.start_warming()
        self.lifecycle.mark_ready("test")
        cfg = DrainConfig(**{"propagation_delay_s": 0.05, "settle_s": 0.1, **drain})
        self.refreshes = 0
        self._answer: Vllm | str | None = None
        self.drainer = DrainController(self.lifecycle, self.snapshot, cfg, refresh=self.refresh, clock=self.clock)

    def vllm(self, in_flight: float, completed: float = 0, aborted: float = 0) -> None:
        self._answer = Vllm(in_flight, completed, aborted)
        self._record()

    def vllm_fails(self, code: str) -> None:
        self._answer = code
        self._record()

    async def refresh(self) -> None:
        self.refreshes += 1
        self._record()

    def _record(self) -> None:
        if isinstance(self._answer, Vllm):
            self.snapshot.put("vllm", self._answer, stale_after_s=5)
        elif self._answer is not None:
            self.snapshot.fail("vllm", f"failed: {self._answer}", stale_after_s=5, code=self._answer)


@pytest.fixture
async def node():
    n = Node()
    task = asyncio.create_task(n.drainer.run())
    yield n
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def seen_at_least(node: Node, deadline_s: float, advanced_s: float) -> None:
    """Wait until the drain has evaluated at a time `advanced_s` past the drain start
    (its progress says how far the deadline is)."""
    await until(
        lambda: node.drainer.progress is not None and node.drainer.progress.deadline_in_s <= deadline_s - advanced_s,
        2,
        what=f"the drain at +{advanced_s:g}s",
    )


async def feed_until_state(node: Node, state: State, feed, timeout_s: float = 3.0) -> None:
    async def check() -> bool:
        feed()
        return node.lifecycle.state is state

    await until(check, timeout_s, 0.02, f"state {state}")


async def test_signal_drain_waits_for_in_flight_then_terminates(node: Node) -> None:
    node.vllm(4, completed=10)
    node.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=10)
    await until(lambda: node.drainer.progress and node.drainer.progress.phase == "waiting", 2)
    node.vllm(4, completed=10)
    node.clock.advance(0.3)  # past propagation and settle
    await seen_at_least(node, 10, 0.3)
    assert node.lifecycle.state is State.DRAINING  # 4 still in flight
    await feed_until_state(node, State.TERMINATED, lambda: node.vllm(0, completed=14))
    report = node.drainer.report
    assert report.outcome == "emptied"
    assert (report.completed, report.aborted, report.in_flight_at_notice) == (4, 0, 4)


async def test_deadline_with_work_still_running_counts_it_aborted() -> None:
    node = Node()
    task = asyncio.create_task(node.drainer.run())
    node.vllm(3)
    node.lifecycle.begin_drain(DrainReason.PREEMPTION, Source.METADATA, deadline_s=0.4)
    await feed_until_state(node, State.TERMINATED, lambda: node.vllm(3))
    task.cancel()
    assert node.drainer.report.outcome == "deadline"
    assert node.drainer.report.aborted == 3


async def test_refusing_vllm_has_nothing_in_flight(node: Node) -> None:
    node.vllm(2)
    node.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=10)
    await feed_until_state(node, State.TERMINATED, lambda: node.vllm_fails("refused"))
    assert node.drainer.report.outcome == "emptied"


@pytest.mark.parametrize("code", ["timeout", "garbage", "http_500"])
async def test_hung_or_garbage_vllm_is_never_taken_as_empty(code: str) -> None:
    node = Node()
    task = asyncio.create_task(node.drainer.run())
    node.vllm(2)
    node.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=0.6)
    node.clock.advance(0.4)
    await seen_at_least(node, 0.6, 0.4)
    node.vllm_fails(code)
    assert node.lifecycle.state is State.DRAINING
    node.clock.advance(0.3)  # past the deadline
    await until(lambda: node.lifecycle.state is State.TERMINATED, 3)
    task.cancel()
    assert node.drainer.report.outcome == "deadline"  # only the deadline ended it


async def test_old_zero_reading_from_before_the_drain_does_not_count(node: Node) -> None:
    node.vllm(0)  # taken before the drain and the propagation delay
    node._answer = "timeout"  # from now on vLLM hangs: the drain's own reads fail
    node.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=10)
    node.clock.advance(0.4)  # past propagation and settle
    await seen_at_least(node, 10, 0.4)
    await until(lambda: node.refreshes >= 2, 2, what="a read after the propagation delay")
    assert node.lifecycle.state is State.DRAINING
    assert node.drainer.progress.in_flight_known is False
    assert node.refreshes >= 2  # it kept asking (at the notice, and after the propagation delay)


async def test_the_drain_reads_vllm_itself_at_the_notice_and_before_it_decides(node: Node) -> None:
    node.vllm(3, completed=50)  # a reading from before the notice, counters now stale
    node._answer = Vllm(2, 51, 0)  # what vLLM says at the notice: one more finished since
    node.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=10)
    await until(lambda: node.drainer.progress is not None, 2)
    assert node.drainer.progress.in_flight_at_notice == 2  # read at the notice, not 3
    await feed_until_state(node, State.TERMINATED, lambda: node.vllm(0, completed=53))
    assert node.drainer.report.completed == 2  # 53 - 51: the one before the notice is not the drain's
    assert node.refreshes >= 2


async def test_admin_drain_stays_draining_marked_drained(node: Node) -> None:
    node.lifecycle.begin_drain(DrainReason.ADMIN, Source.ADMIN_API, deadline_s=10)
    await until(lambda: (node.vllm(0), node.lifecycle.drain.drained)[1], 3)
    assert node.lifecycle.state is State.DRAINING
    assert node.lifecycle.reason == "admin_drained"


async def test_signal_after_admin_drained_terminates(node: Node) -> None:
    node.lifecycle.begin_drain(DrainReason.ADMIN, Source.ADMIN_API, deadline_s=10)
    await until(lambda: (node.vllm(0), node.lifecycle.drain.drained)[1], 3)
    node.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=10)
    await feed_until_state(node, State.TERMINATED, lambda: node.vllm(0))


async def test_force_skips_propagation_and_waiting() -> None:
    node = Node(propagation_delay_s=30)
    task = asyncio.create_task(node.drainer.run())
    node.vllm(5)
    node.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=300)
    await until(lambda: node.drainer.progress is not None, 2)
    node.drainer.skip_waiting()
    await until(lambda: node.lifecycle.state is State.TERMINATED, 1)
    task.cancel()
    assert node.drainer.report.outcome == "forced"
    assert node.drainer.report.aborted == 5


async def test_resume_during_admin_drain_stops_the_drain_task(node: Node) -> None:
    node.vllm(3)
    node.lifecycle.begin_drain(DrainReason.ADMIN, Source.ADMIN_API, deadline_s=10)
    await until(lambda: node.drainer.progress is not None, 2)
    node.lifecycle.resume()
    await until(lambda: node.drainer.progress is None, 2)
    assert node.lifecycle.state is State.WARMING
    assert node.drainer.report is None


async def test_vllm_restart_during_drain_does_not_give_negative_counts(node: Node) -> None:
    node.vllm(2, completed=100, aborted=5)
    node.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=10)
    await until(lambda: node.drainer.progress is not None, 2)
    await feed_until_state(node, State.TERMINATED, lambda: node.vllm(0, completed=1, aborted=0))
    assert node.drainer.report.completed == 1
    assert node.drainer.report.aborted == 0
