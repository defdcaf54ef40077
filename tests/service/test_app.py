"""The HTTP service in-process: build_app on a real, unstarted Daemon behind
aiohttp's test client. The same admin cases run against a real `gpu-node-agent run`
in tests/agent/test_run.py; here they cost milliseconds each."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.daemon import Daemon
from service.app import build_app
from state_machine import DrainReason, Source, State
from tests.agent.test_run import BAD_ADMIN_CALLS
from tests.harness import inprocess_config


@pytest.fixture
def daemon(tmp_path: Path) -> Daemon:
    cfg = inprocess_config(tmp_path, GPU_AGENT_GPU__ENABLED="false")
    return Daemon(cfg, environ={})


@pytest.fixture
async def client(aiohttp_client: Any, daemon: Daemon) -> Any:
    return await aiohttp_client(build_app(daemon, daemon.admin_auth))


@pytest.mark.parametrize(("path", "headers", "body", "status", "expected"), BAD_ADMIN_CALLS)
async def test_a_bad_admin_request_gets_a_4xx_with_its_reason_and_changes_nothing(
    client: Any, daemon: Daemon, path: str, headers: dict[str, str], body: str, status: int, expected: str
) -> None:
    async with client.post(path, data=body, headers=headers) as resp:
        answer = await resp.json()
    assert resp.status == status and expected in answer["error"], (resp.status, answer)
    assert daemon.lifecycle.state is State.INIT


async def test_an_empty_body_of_any_type_is_a_drain_with_the_defaults(client: Any, daemon: Daemon) -> None:
    async with client.post("/drain", data=b"", headers={"Content-Type": "text/plain"}) as resp:
        answer = await resp.json()
    assert resp.status == 202 and answer["started"] is True and answer["persisted"] is True
    assert daemon.lifecycle.drain is not None and daemon.lifecycle.drain.reason is DrainReason.ADMIN
    assert daemon.lifecycle.drain.detail == "admin drain"


async def test_readyz_is_503_with_the_reason_until_ready_and_healthz_stays_200(client: Any, daemon: Daemon) -> None:
    async with client.get("/readyz") as resp:
        assert resp.status == 503 and (await resp.json())["state"] == "INIT"
    daemon.lifecycle.start_warming()
    daemon.lifecycle.mark_ready("test")
    async with client.get("/readyz") as resp:
        assert resp.status == 200 and (await resp.json()) == {"state": "READY", "ready": True}
    async with client.post("/drain", json={"reason": "kernel upgrade"}) as resp:
        assert resp.status == 202
    async with client.get("/readyz") as resp:
        assert resp.status == 503 and (await resp.json())["reason"] == "admin"
    async with client.get("/healthz") as resp:
        assert resp.status == 200 and (await resp.json())["state"] == "DRAINING"


async def test_resume_ends_an_admin_drain_and_is_refused_for_a_signal_drain(client: Any, daemon: Daemon) -> None:
    async with client.post("/drain", json={"reason": "cordon"}) as resp:
        assert resp.status == 202
    async with client.post("/resume") as resp:
        assert resp.status == 200 and (await resp.json())["resumed"] is True
    assert daemon.lifecycle.state is State.WARMING
    daemon.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=30)
    async with client.post("/resume") as resp:
        answer = await resp.json()
    assert resp.status == 409 and "signal drain" in answer["error"]


async def test_a_terminated_node_refuses_a_drain_with_409(client: Any, daemon: Daemon) -> None:
    daemon.lifecycle.begin_drain(DrainReason.SIGNAL, Source.SIGNAL, deadline_s=30)
    daemon.lifecycle.terminate("test")
    async with client.post("/drain") as resp:
        assert resp.status == 409 and "terminated" in (await resp.json())["error"]
