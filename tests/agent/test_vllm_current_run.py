"""Current vLLM's signals through a real `gpu-node-agent run`: the autoscalers' queue
counts only requests waiting for capacity, in-flight counts every waiting request,
errors are failed (not completed) in the drain report, and engine health and queue
time reach /status."""

from __future__ import annotations

import signal

import aiohttp
import pytest

from agent.sim.vllm import FakeVllm
from tests.harness import AgentProcess, get_json, status_is, until


@pytest.fixture
async def vllm():
    fake = FakeVllm(engines=2)
    await fake.start()
    yield fake
    await fake.stop()


async def test_deferred_requests_are_in_flight_but_not_the_autoscalers_queue(tmp_path, vllm) -> None:
    vllm.set_load(running=2, waiting=5, engine=0)
    vllm.deferred[0] = 3  # waiting on a KV transfer or a LoRA budget
    vllm.engine_healthy[1] = False
    for _ in range(10):
        vllm.observe_request(0, queue_s=0.4)
    agent = await AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start().started()
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            for _ in range(10):  # a second scrape's worth of queue times
                vllm.observe_request(1, queue_s=1.2)

            async def reading() -> dict | None:
                value = (await get_json(http, f"{agent.url}/status"))[1]["readings"]["vllm"]["value"]
                return value if value and value["queue_time_s"].get("p95") else None

            value = await until(reading, 10, 0.1, "queue time over the window")
            assert (value["requests_waiting"], value["queue_waiting"], value["waiting_deferred"]) == (5, 2, 3)
            assert value["in_flight"] == 7  # running + every waiting request: the drain waits for all
            assert value["engines_unhealthy"] == 1
            assert 0.5 < value["queue_time_s"]["p95"] <= 2.5
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["autoscaling"]["vllm/queue_length"] == 2
            assert full["autoscaling"]["queue/pending_requests"] == 4  # capacity-waiting + running
            async with http.get(f"{agent.url}/metrics") as resp:
                text = await resp.text()
            assert "gpu_node_agent_vllm_queue_length 2.0" in text and "gpu_node_agent_vllm_requests_deferred 3.0" in text
    finally:
        agent.kill()


async def test_requests_that_finish_with_an_error_are_failed_in_the_report(tmp_path, vllm) -> None:
    vllm.set_load(running=4)
    agent = await AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start().started()
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            agent.send(signal.SIGTERM)

            async def drain_waiting() -> bool:
                drain = (await get_json(http, f"{agent.url}/status"))[1]["drain"]
                return bool(drain and drain["progress"] and drain["progress"]["phase"] == "waiting")

            await until(drain_waiting, 5)
            vllm.set_load(running=0)
            for reason in ("stop", "stop", "error"):
                vllm.observe_request(0, reason=reason)
            vllm.abort(0)
            assert await agent.exited(20) == 0
        report = agent.logs("drain finished")[0]["drain"]
        assert (report["completed"], report["failed"], report["aborted"]) == (2, 1, 0)
    finally:
        agent.kill()
