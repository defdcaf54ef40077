"""Signals a daemon meets in the field, sent to a real `gpu-node-agent run`: none of
them kills it; SIGHUP, SIGUSR1 and SIGUSR2 do their documented jobs; any number of
stop signals, however close together, ends in exit 0."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from agent.sim.vllm import FakeVllm
from tests.harness import AgentProcess, get_json, status_is, until


async def ready_agent(tmp_path, vllm: FakeVllm) -> AgentProcess:
    agent = await AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start().started()
    async with aiohttp.ClientSession() as http:
        await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
    return agent


async def test_sighup_usr1_and_usr2_do_their_jobs_and_never_kill_or_drain_the_agent(tmp_path, vllm) -> None:
    agent = await ready_agent(tmp_path, vllm)
    try:
        for sig, message in (
            (signal.SIGHUP, "SIGHUP"),
            (signal.SIGUSR1, "status (SIGUSR1)"),
            (signal.SIGUSR2, "stacks (SIGUSR2)"),
        ):
            agent.send(sig)
            await until(lambda m=message: [e for e in agent.logs() if e["message"].startswith(m)], 5, what=message)
        assert agent.proc.poll() is None
        status = agent.logs("status (SIGUSR1)")[0]["status"]
        assert status["state"] == "READY" and "readings" in status
        stacks = agent.logs("stacks (SIGUSR2)")[0]
        assert any(task.startswith("probe.vllm") for task in stacks["tasks"])
        assert stacks["threads"]
        async with aiohttp.ClientSession() as http:
            _, full = await get_json(http, f"{agent.url}/status")
        assert full["state"] == "READY"
        assert [t["to"] for t in full["history"]] == ["WARMING", "READY"]
        agent.send(signal.SIGTERM)
        assert await agent.exited() == 0
    finally:
        agent.kill()


@pytest.mark.parametrize("gap_ms", [5, 20, 50])
async def test_a_third_stop_signal_right_after_the_second_still_ends_in_exit_0(tmp_path, vllm, gap_ms) -> None:
    agent = await ready_agent(tmp_path, vllm)
    try:
        agent.send(signal.SIGTERM)
        await asyncio.sleep(0.05)
        agent.send(signal.SIGTERM)  # skips the waiting: shutdown starts at once
        await asyncio.sleep(gap_ms / 1000)
        agent.send(signal.SIGTERM)  # lands in the shutdown, or after the loop is gone
        assert await agent.exited() == 0
    finally:
        agent.kill()


async def test_a_stop_signal_during_start_up_drains_and_exits_0(tmp_path, vllm) -> None:
    agent = AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start()
    try:
        # Once the early handlers are in (the first log line is written after them), a
        # SIGTERM before the loop runs is kept and replayed as the first stop signal.
        await until(lambda: agent.raw, 15, 0.005, "first log line")
        agent.send(signal.SIGTERM)
        started = time.monotonic()
        assert await agent.exited() == 0
        assert time.monotonic() - started < 10
        assert agent.logs("stop signal received; draining")
    finally:
        agent.kill()
