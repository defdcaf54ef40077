"""Fixtures for tests that drive a real `gpu-node-agent run`: a fake vLLM on loopback,
and a launcher that starts agents against it and kills them after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from agent.sim.vllm import FakeVllm
from tests.harness import AgentProcess

Launch = Callable[..., Awaitable[AgentProcess]]


@pytest.fixture
def fake_vllm(vllm: FakeVllm) -> FakeVllm:
    """The shared `vllm` fixture (tests/conftest.py), under the name these tests use."""
    return vllm


@pytest.fixture
async def launch(tmp_path: Path, fake_vllm: FakeVllm) -> AsyncIterator[Launch]:
    """`await launch(**env)`: an agent on `fake_vllm`, started and listening; env entries
    are GPU_AGENT_* (or other) variables on top of tests/harness.py's defaults."""
    started: list[AgentProcess] = []

    async def start(**env: str) -> AgentProcess:
        home = tmp_path / f"agent-{len(started)}"
        home.mkdir()
        agent = AgentProcess(home, {"GPU_AGENT_INFERENCE__BASE_URL": fake_vllm.url, **env}).start()
        started.append(agent)
        return await agent.started()

    yield start
    for agent in started:
        agent.kill()
