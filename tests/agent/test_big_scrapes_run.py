"""A vLLM whose /metrics explodes, through a real `gpu-node-agent run`: the event loop
never stalls on the scrape (/readyz keeps answering), the work is bounded (the scrape
is dropped as too large), and the agent's own /metrics stays small whatever vLLM
serves (label values it re-exports come from an allow-list)."""

from __future__ import annotations

import time

import aiohttp
import pytest

from tests.harness import AgentProcess, get_json, status_is, until


def label_explosion(lines: int) -> bytes:
    """Short lines: 100k of them fit well under the 8 MB body cap (~5 MB)."""
    return "".join(f'vllm:request_success_total{{finished_reason="reason-{i}"}} 1\n' for i in range(lines)).encode()


async def worst_readyz_s(http: aiohttp.ClientSession, url: str, seconds: float) -> float:
    worst = 0.0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        started = time.perf_counter()
        assert await status_is(http, f"{url}/readyz", 200)
        worst = max(worst, time.perf_counter() - started)
    return worst


async def metrics_lines(http: aiohttp.ClientSession, url: str) -> list[str]:
    async with http.get(f"{url}/metrics") as resp:
        return (await resp.text()).splitlines()


@pytest.mark.parametrize("case", ["100k label values", "one 7 MB line"])
async def test_an_exploding_exposition_is_dropped_as_too_large_without_stalling_readyz(tmp_path, vllm, case) -> None:
    agent = await AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start().started()
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            if case == "100k label values":
                vllm.extra_metrics = label_explosion(100_000)
            else:
                vllm.extra_metrics = b'vllm:num_requests_waiting{engine="0",model_name="' + b"x" * 7_000_000 + b'"} 1\n'

            async def too_large() -> bool:
                return (await get_json(http, f"{agent.url}/status"))[1]["readings"]["vllm"]["error_code"] == "too_large"

            await until(too_large, 10, 0.1)
            # Scraped every 0.1 s all along: a scrape on the loop used to stall it 1.6-2.8 s.
            assert await worst_readyz_s(http, agent.url, 3.0) < 0.5
            lines = await metrics_lines(http, agent.url)
            assert len(lines) < 400 and not any("reason-" in line or "xxxx" in line for line in lines)
    finally:
        agent.kill()


async def test_label_values_the_agent_re_exports_come_from_an_allow_list(tmp_path, vllm) -> None:
    vllm.extra_metrics = label_explosion(5_000)  # under the line cap: read, and folded
    agent = await AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start().started()
    try:
        async with aiohttp.ClientSession() as http:
            lines: list[str] = []

            async def scraped() -> bool:  # READY comes from /health: the first scrape may still be on its way
                lines[:] = await metrics_lines(http, agent.url)
                return any(line.startswith("gpu_node_agent_vllm_requests_finished_total") for line in lines)

            await until(scraped, 20, 0.2)
            finished = [line for line in lines if line.startswith("gpu_node_agent_vllm_requests_finished_total")]
            assert 'gpu_node_agent_vllm_requests_finished_total{finished_reason="other"} 5000.0' in finished
            assert len(finished) <= 6
            assert len(lines) < 400
            _, full = await get_json(http, f"{agent.url}/status")
            assert set(full["readings"]["vllm"]["value"]["requests_finished_total"]) <= {
                "stop",
                "length",
                "abort",
                "error",
                "repetition",
                "other",
            }
    finally:
        agent.kill()
