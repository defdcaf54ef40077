"""The agent's /metrics, every feature on (8 fake GPUs, a 4-engine vLLM with traffic,
metadata, export), passes Prometheus' own linter: `promtool check metrics`."""

from __future__ import annotations

import subprocess
import sys

import aiohttp

from agent.sim.metadata import FakeMetadataServer
from agent.sim.monitoring import FakeMetricService
from agent.sim.vllm import FakeVllm
from tests.harness import AgentProcess, status_is, until
from tests.tools import require_tool


def promtool() -> str:
    return require_tool("promtool", "prometheus")


async def test_promtool_finds_nothing_to_say_about_a_live_agents_metrics(tmp_path) -> None:
    tool = promtool()
    vllm, meta, sink = FakeVllm(engines=4), FakeMetadataServer(), FakeMetricService()
    for server in (vllm, meta, sink):
        await server.start()
    env = {
        "GPU_AGENT_INFERENCE__BASE_URL": vllm.url,
        "GPU_AGENT_GPU__ENABLED": "true",
        "GPU_AGENT_PREEMPTION__ENABLED": "auto",
        "GCE_METADATA_HOST": meta.address,
        "GPU_AGENT_EXPORT__ENABLED": "true",
        "GPU_AGENT_EXPORT__ENDPOINT": sink.endpoint,
        "GPU_AGENT_EXPORT__INSECURE": "true",
        "GPU_AGENT_EXPORT__INTERVAL_S": "10",
    }
    agent = AgentProcess(tmp_path, env, argv=[sys.executable, "-m", "bench.agent_all_features"])
    try:
        await agent.start().started()
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 15)
            for engine in range(4):  # requests in two scrapes' window: quantiles to render
                for _ in range(20):
                    vllm.observe_request(engine, reason="stop")
            vllm.observe_request(0, reason="error")

            async def full_exposition() -> str | None:
                async with http.get(f"{agent.url}/metrics") as resp:
                    text = await resp.text()
                return text if 'quantile="0.95"' in text and "gpu_node_agent_gpu_utilization_ratio" in text else None

            text = await until(full_exposition, 10, 0.2, "quantiles and GPUs in /metrics")
        result = subprocess.run([tool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
        assert (result.stdout + result.stderr).strip() == ""
        assert "# TYPE gpu_node_agent_vllm_ttft_seconds summary" in text
    finally:
        agent.kill()
        for server in (vllm, meta, sink):
            await server.stop()


def test_promtool_does_speak_up_on_a_bad_exposition() -> None:
    # The check above is worth something only if promtool complains about what we fixed.
    bad = '# HELP x_seconds doc\n# TYPE x_seconds gauge\nx_seconds{quantile="0.5"} 1\n'
    result = subprocess.run([promtool(), "check", "metrics"], input=bad, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "quantile" in result.stdout + result.stderr
