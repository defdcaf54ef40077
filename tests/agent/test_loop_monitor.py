"""The event-loop lag monitor sees a stall of the loop it runs on."""

from __future__ import annotations

import asyncio
import time

from agent.loop_monitor import LoopMonitor
from tests.harness import until


async def test_the_loop_monitor_reports_a_stall_it_saw() -> None:
    monitor = LoopMonitor(interval_s=0.01)
    task = asyncio.create_task(monitor.run())
    try:
        await asyncio.sleep(0.05)
        time.sleep(0.12)  # the loop is blocked: the monitor wakes 0.1 s late
        await until(lambda: monitor.stalls_total >= 1, 2)
        assert monitor.recent_max_s() >= 0.1
        assert monitor.describe()["max_ms_last_minute"] >= 100
    finally:
        task.cancel()
