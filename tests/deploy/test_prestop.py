"""The vLLM preStop hook from deploy/gke/deployment.yaml, run as the kubelet would
(a plain python3 with the exact script, only the agent's address substituted)
against a live `gpu-node-agent run` on loopback with a fake vLLM behind it: it drains
the agent and returns only once nothing is in flight; then the rest of the pod's
termination (vLLM gone, SIGTERM to the sidecar) ends the agent with exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent.sim.vllm import FakeVllm
from tests.deploy.support import prestop_command
from tests.harness import AgentProcess, get_json, until

MANIFEST_AGENT_URL = "http://127.0.0.1:8095"
# A proxy that would refuse everything: the hook must not send loopback through it.
DEAD_PROXY = "http://127.0.0.1:9"


def hook_argv(agent_url: str) -> list[str]:
    interpreter, flag, script = prestop_command()
    assert (interpreter, flag) == ("python3", "-c") and MANIFEST_AGENT_URL + "/drain" in script
    return [sys.executable, flag, script.replace(MANIFEST_AGENT_URL, agent_url)]


async def start_hook(agent_url: str) -> asyncio.subprocess.Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_AGENT_")}
    env.update({"HTTP_PROXY": DEAD_PROXY, "http_proxy": DEAD_PROXY, "NO_PROXY": "", "no_proxy": ""})
    return await asyncio.create_subprocess_exec(
        *hook_argv(agent_url), env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVllm]:
    fake = FakeVllm()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def agent(tmp_path: Path, vllm: FakeVllm) -> AsyncIterator[AgentProcess]:
    process = AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start()
    try:
        yield await process.started()
    finally:
        process.kill()


async def drain_progress(session: aiohttp.ClientSession, agent: AgentProcess) -> dict[str, Any]:
    _, status = await get_json(session, f"{agent.url}/status")
    drain = status.get("drain") or {}
    return {"state": status["state"], **(drain.get("progress") or {}), "drained": drain.get("drained")}


async def test_the_prestop_hook_drains_the_agent_and_returns_only_when_nothing_is_in_flight(
    agent: AgentProcess, vllm: FakeVllm, session: aiohttp.ClientSession
) -> None:
    await until(lambda: _status(session, f"{agent.url}/readyz", 200), timeout_s=10, what="agent READY")
    vllm.set_load(running=2, waiting=1)

    hook = await start_hook(agent.url)

    async def waiting_on_three() -> bool:
        progress = await drain_progress(session, agent)
        return progress.get("phase") == "waiting" and progress.get("in_flight_now") == 3

    await until(waiting_on_three, timeout_s=10, what="the agent draining with 3 in flight")
    assert await _status(session, f"{agent.url}/readyz", 503)
    assert hook.returncode is None, "the hook returned while requests were in flight"

    emptied_at = time.monotonic()
    vllm.finish(3)
    async with asyncio.timeout(15):
        out, err = await hook.communicate()
    returned_after_s = time.monotonic() - emptied_at

    assert hook.returncode == 0, err.decode()
    answer = json.loads(out)
    assert answer["drained"] is True and answer["drain"]["reason"] == "admin"
    assert answer["drain"]["detail"] == "pod terminating (preStop)"
    settle_s = float(agent.env["GPU_AGENT_DRAIN__SETTLE_S"])
    assert returned_after_s >= settle_s  # in-flight had to stay at zero for settle_s
    progress = await drain_progress(session, agent)
    assert progress["state"] == "DRAINING" and progress["drained"] is True

    # The rest of the pod's termination: vLLM exits, then the sidecar gets SIGTERM.
    await vllm.stop()
    agent.send(signal.SIGTERM)
    assert await agent.exited(timeout_s=15) == 0, agent.output()


async def test_the_prestop_hook_fails_fast_when_the_agent_is_unreachable() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    started = time.monotonic()
    hook = await start_hook(closed_url)
    async with asyncio.timeout(10):
        _, err = await hook.communicate()
    assert hook.returncode == 1
    assert "unreachable" in err.decode()
    assert time.monotonic() - started < 10  # vLLM is not held for the grace period


async def _status(session: aiohttp.ClientSession, url: str, expected: int) -> bool:
    try:
        async with session.get(url) as resp:
            return resp.status == expected
    except aiohttp.ClientError:
        return False
