"""The daemon's phases in-process: the injected stop trigger ends serve() as SIGTERM
does, and whatever ends serve() (a cancellation included) closes what start-up opened."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest

from agent.config import AgentConfig
from agent.daemon import Daemon
from agent.sim.vllm import FakeVllm
from state_machine import DrainReason, State
from tests.harness import inprocess_config, until


def config(tmp_path: Path, vllm: FakeVllm) -> AgentConfig:
    return inprocess_config(tmp_path, vllm.url, GPU_AGENT_GPU__ENABLED="false")


@pytest.fixture
async def vllm():
    fake = FakeVllm()
    await fake.start()
    yield fake
    await fake.stop()


async def test_setting_the_injected_stop_trigger_drains_like_sigterm_and_ends_serve(tmp_path: Path, vllm: FakeVllm) -> None:
    stop = asyncio.Event()
    daemon = Daemon(config(tmp_path, vllm), environ={}, stop=stop)
    serving = asyncio.create_task(daemon.serve())
    await until(lambda: daemon.lifecycle.state is State.READY, 10, what="READY")
    stop.set()
    await asyncio.wait_for(serving, 10)
    assert daemon.lifecycle.state is State.TERMINATED
    assert daemon.lifecycle.drain is not None and daemon.lifecycle.drain.reason is DrainReason.SIGNAL
    assert daemon.lifecycle.drain.detail == "stop trigger" and daemon.signals_received == 1
    # Tasks that finish are done, not restarted: the idle watchdog is off in this config.
    assert daemon.supervisor is not None and daemon.supervisor.describe()["idle"]["finished"] is True


async def test_a_cancelled_serve_still_closes_its_client_sessions_and_its_port(tmp_path: Path, vllm: FakeVllm) -> None:
    daemon = Daemon(config(tmp_path, vllm), environ={})
    serving = asyncio.create_task(daemon.serve())
    await until(lambda: daemon.lifecycle.state is State.READY, 10, what="READY")
    port = daemon.bound_port
    serving.cancel()
    with pytest.raises(asyncio.CancelledError):
        await serving
    sessions = [daemon.inference_session, daemon.metadata_session]
    assert all(s is not None and s.closed for s in sessions)
    async with aiohttp.ClientSession() as http:
        with pytest.raises(aiohttp.ClientConnectionError):
            await http.get(f"http://127.0.0.1:{port}/healthz")
