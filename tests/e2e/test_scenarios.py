"""Whole-node scenarios: the agent as a subprocess, a fake vLLM serving real
completions, and a load balancer that polls /readyz and sends traffic only to a
ready node. Each asserts what users care about: nothing admitted to a node the LB
held unready, every admitted request completed or counted, the right exit."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from agent.sim.vllm import FakeVllm
from tests.e2e.lb import LoadBalancer
from tests.harness import AgentProcess, get_json, until


@pytest.fixture
async def vllm():
    fake = FakeVllm()
    fake.ttft_s, fake.tpot_s = 0.05, 0.02  # ~0.35 s per completion
    await fake.start()
    yield fake
    await fake.stop()


async def ready_agent(tmp_path: Path, vllm: FakeVllm, **settings: str) -> AgentProcess:
    env = {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url, "GPU_AGENT_DRAIN__PROPAGATION_DELAY_S": "0.5"}
    env.update({f"GPU_AGENT_{k.upper()}": v for k, v in settings.items()})
    agent = AgentProcess(tmp_path, env).start()
    await agent.started()
    async with aiohttp.ClientSession() as http:
        async def ready() -> bool:
            return (await get_json(http, f"{agent.url}/readyz"))[0] == 200

        await until(ready, 10, 0.05, "READY")
    return agent


async def test_rolling_restart_by_sigterm_loses_no_request(tmp_path, vllm) -> None:
    agent = await ready_agent(tmp_path, vllm)
    lb = LoadBalancer(f"{agent.url}/readyz", vllm.url, rate_rps=30)
    try:
        traffic = asyncio.create_task(lb.run(duration_s=4.0))
        await until(lambda: lb.out.completed >= 20, 5, what="traffic flowing")
        agent.send(signal.SIGTERM)
        assert await agent.exited(15) == 0
        exited_at = time.monotonic()
        out = await traffic
    finally:
        agent.kill()
    assert out.failed == 0 and out.admitted_while_unhealthy == 0
    assert out.completed == out.admitted
    assert out.last_completion_at <= exited_at  # the agent left only once the node was empty
    assert out.healthy_changes[-1][1] is False  # the LB saw the node go unhealthy
    report = agent.logs("agent stopping")[0]["termination_report"]
    assert report["outcome"] == "emptied" and report["aborted"] == 0
    assert report["completed"] >= 1


async def test_the_termination_report_agrees_with_what_the_load_balancer_saw(tmp_path, vllm) -> None:
    """completed = requests vLLM finished after the notice; the LB stand-in counts the
    same thing from its side. They must agree within 5 % (the baseline is read at the
    notice, not taken from a reading up to a poll interval old)."""
    agent = await ready_agent(tmp_path, vllm, inference__poll_interval_s="1")
    lb = LoadBalancer(f"{agent.url}/readyz", vllm.url, rate_rps=40)
    try:
        traffic = asyncio.create_task(lb.run(duration_s=4.0))
        await until(lambda: lb.out.completed >= 40, 5, what="traffic flowing")
        noticed = time.monotonic()
        agent.send(signal.SIGTERM)
        assert await agent.exited(15) == 0
        out = await traffic
    finally:
        agent.kill()
    report = agent.logs("agent stopping")[0]["termination_report"]
    seen_by_lb = sum(1 for t in out.completion_times if t > noticed)
    assert out.failed == 0 and report["outcome"] == "emptied"
    assert seen_by_lb >= 10
    assert abs(report["completed"] - seen_by_lb) <= max(1, 0.05 * seen_by_lb), (report, seen_by_lb)


async def test_vllm_crash_and_recovery_under_traffic(tmp_path, vllm) -> None:
    agent = await ready_agent(tmp_path, vllm)
    lb = LoadBalancer(f"{agent.url}/readyz", vllm.url, rate_rps=20)
    try:
        traffic = asyncio.create_task(lb.run(duration_s=6.0))
        await until(lambda: lb.out.completed >= 10, 5, what="traffic flowing")
        await vllm.refuse()  # vLLM crashed: connections refused
        await until(lambda: not lb.healthy, 5, what="LB takes the node out")
        failed_during_crash = lb.out.failed
        admitted_at_crash = lb.out.admitted
        await asyncio.sleep(0.5)
        assert lb.out.admitted == admitted_at_crash  # nothing sent while unready
        await vllm.accept()  # restarted
        await until(lambda: lb.healthy, 10, what="LB puts the node back")
        out = await traffic
    finally:
        agent.kill()
    assert out.admitted_while_unhealthy == 0
    assert out.completed > 20
    # Requests lost to the crash itself are bounded by what was sent before the agent noticed.
    assert out.failed == failed_during_crash
    states = [e["state"] for e in agent.logs() if e.get("message", "").startswith("state ")]
    assert states[-3:] == ["READY", "WARMING", "READY"]
