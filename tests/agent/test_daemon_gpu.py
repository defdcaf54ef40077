"""GPU signals inside the running daemon: a fatal XID or a lost GPU drains the node
with reason gpu_fault; no driver is reported, never a crash."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from agent.daemon import Daemon
from agent.sim.nvml import FakeNvml
from agent.sim.vllm import FakeVllm
from tests.harness import AgentProcess, get_json, inprocess_config, until


def config(tmp_path: Path, vllm: FakeVllm) -> object:
    return inprocess_config(tmp_path, vllm.url, GPU_AGENT_GPU__POLL_INTERVAL_S="0.1")


@pytest.fixture
async def node(tmp_path: Path):
    vllm = FakeVllm()
    await vllm.start()
    nvml = FakeNvml(count=2)
    daemon = Daemon(config(tmp_path, vllm), environ={}, nvml=nvml)
    serving = asyncio.create_task(daemon.serve())
    await until(lambda: daemon.lifecycle.state.value == "READY", 10, what="READY")
    yield daemon, nvml, vllm
    daemon.on_stop_signal()
    daemon.on_stop_signal()
    await asyncio.wait_for(serving, 10)
    await vllm.stop()


async def test_fatal_xid_drains_the_node_with_reason_gpu_fault(node) -> None:
    daemon, nvml, _ = node
    await until(lambda: daemon.xid_watcher is not None and daemon.xid_watcher.state.value == "watching", 5, what="XID watch")
    nvml.emit_xid(1, 79)  # fallen off the bus
    await until(lambda: daemon.lifecycle.state.value in ("DRAINING", "TERMINATED"), 5, what="drain")
    assert daemon.lifecycle.drain.reason.value == "gpu_fault"
    assert "79" in daemon.lifecycle.drain.detail
    async with aiohttp.ClientSession() as http:
        status, body = await get_json(http, f"http://127.0.0.1:{daemon.bound_port}/readyz")
        assert status == 503
        _, full = await get_json(http, f"http://127.0.0.1:{daemon.bound_port}/status")
        assert full["gpu"]["faults"]["drained_for"]["xid"] == 79
        async with http.get(f"http://127.0.0.1:{daemon.bound_port}/metrics") as resp:
            text = await resp.text()
    assert 'gpu_node_agent_gpu_faults_total{fatal="true",kind="xid"} 1.0' in text
    # a GPU-fault drain is terminal: it ends TERMINATED and stays up serving 503
    await until(lambda: daemon.lifecycle.state.value == "TERMINATED", 5)


async def test_application_xid_does_not_drain(node) -> None:
    daemon, nvml, _ = node
    await until(lambda: daemon.xid_watcher is not None and daemon.xid_watcher.state.value == "watching", 5)
    nvml.emit_xid(0, 13)  # graphics engine exception: the application's problem
    await asyncio.sleep(0.5)
    assert daemon.lifecycle.state.value == "READY"


async def test_gpu_figures_reach_status_and_metrics(node) -> None:
    daemon, nvml, _ = node
    nvml.set(0, utilization_percent=73)
    await until(lambda: (v := daemon.snapshot.value("gpu")) is not None and v.gpus[0].utilization_percent == 73, 5)
    async with aiohttp.ClientSession() as http, http.get(f"http://127.0.0.1:{daemon.bound_port}/metrics") as resp:
        text = await resp.text()
    assert 'gpu_node_agent_gpu_utilization_ratio{gpu="0"} 0.73' in text
    assert "gpu_node_agent_gpus 2.0" in text


async def test_no_driver_is_reported_and_the_node_still_serves(tmp_path: Path) -> None:
    vllm = FakeVllm()
    await vllm.start()
    agent = AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url, "GPU_AGENT_GPU__ENABLED": "true"}).start()
    try:
        await agent.started()
        async with aiohttp.ClientSession() as http:
            async def gpu_reported() -> bool:
                _, full = await get_json(http, f"{agent.url}/status")
                value = full["readings"].get("gpu", {}).get("value")
                return bool(value) and value["status"] == "no_driver" and full["state"] == "READY"

            await until(gpu_reported, 10, 0.1, "no_driver reported while READY")
    finally:
        agent.kill()
        await vllm.stop()
