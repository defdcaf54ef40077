"""The supervisor restarts failing tasks with backoff and never tears the group down."""

from __future__ import annotations

import asyncio

from agent.supervisor import Supervisor
from tests.harness import until


async def test_failing_task_is_restarted_and_others_keep_running() -> None:
    runs = {"flaky": 0, "steady": 0}

    async def flaky() -> None:
        runs["flaky"] += 1
        if runs["flaky"] < 4:
            raise RuntimeError(f"boom {runs['flaky']}")
        await asyncio.Event().wait()

    async def steady() -> None:
        while True:
            runs["steady"] += 1
            await asyncio.sleep(0.01)

    async with Supervisor(backoff_base_s=0.01, backoff_cap_s=0.02) as supervisor:
        supervisor.add("flaky", flaky, critical=True)
        supervisor.add("steady", steady)
        await until(lambda: runs["flaky"] >= 4, 3)
        described = supervisor.describe()
        assert described["flaky"]["restarts"] == 3
        assert described["flaky"]["last_error"] == "RuntimeError: boom 3"
        assert runs["steady"] > 3


async def test_crash_looping_critical_task_is_reported_broken() -> None:
    async def always_fails() -> None:
        raise OSError("disk gone")

    async with Supervisor(backoff_base_s=0.01, backoff_cap_s=0.02) as supervisor:
        supervisor.add("critical", always_fails, critical=True)
        supervisor.add("optional", always_fails)
        await until(lambda: supervisor.broken(), 3)
        assert supervisor.broken() == ["critical"]


async def test_leaving_the_block_cancels_every_task() -> None:
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with Supervisor() as supervisor:
        supervisor.add("forever", forever)
        await asyncio.sleep(0)
    assert cancelled.is_set()
