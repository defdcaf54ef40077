"""vLLM numbers that cannot be true, through a real `gpu-node-agent run`: the scrape
is dropped and counted, the last good values are kept (stale), nothing acts on the
bad ones: a drain never takes them for "empty", autoscalers never see them."""

from __future__ import annotations

import math
import signal

import aiohttp
import pytest

from tests.harness import AgentProcess, get_json, status_is, until


async def vllm_reading(http: aiohttp.ClientSession, agent: AgentProcess) -> dict:
    return (await get_json(http, f"{agent.url}/status"))[1]["readings"]["vllm"]


async def test_negative_running_is_never_read_as_an_empty_node_by_the_drain(tmp_path, vllm) -> None:
    vllm.set_load(running=-5, waiting=5)  # -5 + 5 = 0 "in flight", with 5 requests queued
    agent = (
        await AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url, "GPU_AGENT_DRAIN__TIMEOUT_S": "2"})
        .start()
        .started()
    )
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)  # /health is fine
            await until(lambda: _code_is(http, agent, "invalid"), 5)
            agent.send(signal.SIGTERM)
            assert await agent.exited(20) == 0
        report = agent.logs("drain finished")[0]["drain"]
        assert report["outcome"] == "deadline"  # was "emptied, aborted 0" with 5 queued
        assert report["in_flight_at_notice"] is None
    finally:
        agent.kill()


@pytest.mark.parametrize(
    ("bad", "what"),
    [
        ({"waiting": math.inf}, "+Inf queue"),
        ({"waiting": math.nan}, "NaN queue"),
        ({"running": -1}, "negative running"),
        ({"kv": 1.7}, "KV usage over 1"),
        ({"kv": -0.1}, "KV usage below 0"),
    ],
)
async def test_an_impossible_value_drops_the_scrape_and_keeps_the_last_good_one(tmp_path, vllm, bad, what) -> None:
    vllm.set_load(running=2, waiting=3)
    vllm.kv_cache_usage[0] = 0.4
    agent = await AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start().started()
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            await until(lambda: _autoscaling_queue(http, agent, 3), 5, what="a READY round with queue 3")
            if "kv" in bad:
                vllm.kv_cache_usage[0] = bad["kv"]
            else:
                vllm.set_load(running=bad.get("running", 2), waiting=bad.get("waiting", 3))
            await until(lambda: _code_is(http, agent, "invalid"), 5, what=what)
            reading = await vllm_reading(http, agent)
            assert reading["stale"] is True
            assert reading["value"]["requests_waiting"] == 3 and reading["value"]["kv_cache_usage_ratio"] == 0.4
            _, full = await get_json(http, f"{agent.url}/status")
            # What the node tells the autoscalers: the held value, never 0 and never inf.
            assert full["autoscaling"]["vllm/queue_length"] == 3
            assert full["autoscaling"]["node/demand"] >= 1.0  # a node whose vLLM lies shows no spare capacity
            async with http.get(f"{agent.url}/metrics") as resp:
                text = await resp.text()
            assert "gpu_node_agent_vllm_requests_waiting 3.0" in text
            assert "Inf" not in text.split("gpu_node_agent_vllm_requests_waiting")[1].split("\n")[0]
    finally:
        agent.kill()


async def _code_is(http: aiohttp.ClientSession, agent: AgentProcess, code: str) -> bool:
    return (await vllm_reading(http, agent))["error_code"] == code


async def _autoscaling_queue(http: aiohttp.ClientSession, agent: AgentProcess, value: float) -> bool:
    return (await get_json(http, f"{agent.url}/status"))[1]["autoscaling"]["vllm/queue_length"] == value
