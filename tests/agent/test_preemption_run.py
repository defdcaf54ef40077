"""Spot preemption and host maintenance through a real `gpu-node-agent run` against
fake metadata and vLLM servers (the policy itself: tests/agent/test_preemption.py)."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from agent.sim.metadata import FakeMetadataServer
from agent.sim.vllm import FakeVllm
from tests.harness import AgentProcess, get_json, sees_in_flight, status_is, until


# --- through a real agent process ----------------------------------------------------
@pytest.fixture
async def servers():
    meta, vllm = FakeMetadataServer(), FakeVllm()
    await meta.start()
    await vllm.start()
    yield meta, vllm
    await meta.stop()
    await vllm.stop()


async def start(tmp_path: Path, meta: FakeMetadataServer, vllm: FakeVllm, **settings: str) -> AgentProcess:
    env = {
        "GPU_AGENT_INFERENCE__BASE_URL": vllm.url,
        "GPU_AGENT_PREEMPTION__ENABLED": "auto",
        "GPU_AGENT_PREEMPTION__WATCH_TIMEOUT_S": "2",
        "GCE_METADATA_HOST": meta.address,
    }
    env.update({f"GPU_AGENT_{k.upper()}": v for k, v in settings.items()})
    return await AgentProcess(tmp_path, env).start().started()


async def state(http: aiohttp.ClientSession, agent: AgentProcess) -> str:
    return (await get_json(http, f"{agent.url}/status"))[1]["state"]


async def test_notice_turns_readyz_503_drains_within_the_deadline_and_stays_up(tmp_path, servers) -> None:
    meta, vllm = servers
    agent = await start(tmp_path, meta, vllm, preemption__notice_budget_s="3", drain__safety_margin_s="1")
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: _is(http, agent, "READY"), 10)
            vllm.set_load(running=2)  # never finishes: the deadline must end the drain
            await until(lambda: sees_in_flight(http, agent), 5)
            await meta.set("instance/preempted", "TRUE")
            noticed = time.monotonic()
            await until(lambda: status_is(http, f"{agent.url}/readyz", 503), 2, 0.005, "503")
            assert time.monotonic() - noticed < 1.0
            assert (await get_json(http, f"{agent.url}/healthz"))[0] == 200
            await until(lambda: _is(http, agent, "TERMINATED"), 5)
            drained_in = time.monotonic() - noticed
            assert 1.8 <= drained_in <= 3.0  # the 3 s budget minus the 1 s margin, not drain.timeout_s
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["termination_report"]["outcome"] == "deadline"
            assert full["termination_report"]["aborted"] == 2
            await asyncio.sleep(0.5)
            assert agent.proc.poll() is None  # stays up answering 503 until its own signal
            assert (await get_json(http, f"{agent.url}/readyz"))[0] == 503
            agent.send(signal.SIGTERM)
            assert await agent.exited() == 0
    finally:
        agent.kill()


@pytest.mark.parametrize("prelude", [("503", "reset", "garbage", "503", "reset"), ("garbage",) * 5, ("503",) * 8])
async def test_a_notice_right_after_a_run_of_bad_answers_is_seen_within_two_seconds(tmp_path, servers, prelude) -> None:
    """The watch of instance/preempted never backs off more than ~1 s: after a run of
    bad answers a real TRUE is still seen at once (GCE gives 30 s in all)."""
    meta, vllm = servers
    agent = await start(tmp_path, meta, vllm)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: _is(http, agent, "READY"), 10)
            await until(lambda: meta.parked("instance/preempted") == 1, 5, what="hanging GET parked")
            meta.inject("instance/preempted", *prelude)
            meta.reset_parked("instance/preempted")  # the hanging GET dies; the bad answers follow
            await until(lambda: not meta.faults.get("instance/preempted"), 15, what="bad answers served")
            await meta.set("instance/preempted", "TRUE")
            noticed = time.monotonic()
            await until(lambda: status_is(http, f"{agent.url}/readyz", 503), 5, 0.005, "503")
            assert time.monotonic() - noticed <= 2.0
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["drain"]["reason"] == "preemption"
            # Each bad answer was a failed read (aiohttp retries a GET once on a reused
            # connection that drops, so two resets can be one failed read).
            assert full["probe_errors"]["metadata.preempted"] >= len(prelude) // 2
    finally:
        agent.kill()


async def test_a_hanging_get_that_stops_answering_is_abandoned_at_timeout_sec_plus_a_small_slack(tmp_path, servers) -> None:
    meta, vllm = servers
    agent = await start(tmp_path, meta, vllm)  # watch_timeout_s 2
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: _is(http, agent, "READY"), 10)
            meta.inject("instance/preempted", "hang")  # the next request is held and never answered
            meta.reset_parked("instance/preempted")
            await until(lambda: meta.parked("instance/preempted") == 0 and not meta.faults.get("instance/preempted"), 5)
            hung_at = time.monotonic()
            await meta.set("instance/preempted", "TRUE")  # the held request will never tell
            await until(lambda: status_is(http, f"{agent.url}/readyz", 503), 10, 0.01, "503")
            # timeout_sec (2) + slack (2) + one backoff (<= 1) + a scheduling margin.
            assert time.monotonic() - hung_at <= 5.5
            meta.release_hangs()
    finally:
        agent.kill()


async def test_faults_and_flapping_never_cause_a_false_drain(tmp_path, servers) -> None:
    meta, vllm = servers
    agent = await start(tmp_path, meta, vllm)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: _is(http, agent, "READY"), 10)
            for fault in ("503", "reset", "garbage", "503", "reset"):
                meta.inject("instance/preempted", fault)
            for value in ("MIGRATE_ON_HOST_MAINTENANCE", "NONE", "MIGRATE_ON_HOST_MAINTENANCE", "NONE"):
                await meta.set("instance/maintenance-event", value)
                await asyncio.sleep(0.1)
            await until(lambda: not meta.faults.get("instance/preempted"), 15, what="faults consumed")
            await asyncio.sleep(0.5)
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["state"] == "READY"
            assert [t["to"] for t in full["history"]] == ["WARMING", "READY"]
            values = [e["value"] for e in full["preemption"]["events"] if e["kind"] == "maintenance_event"]
            assert "MIGRATE_ON_HOST_MAINTENANCE" in values  # recorded, not drained
    finally:
        agent.kill()


async def test_agent_restarted_on_a_preempted_node_never_becomes_ready(tmp_path, servers) -> None:
    meta, vllm = servers
    await meta.set("instance/preempted", "TRUE")
    agent = await start(tmp_path, meta, vllm)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: _is(http, agent, "TERMINATED"), 10)
            await asyncio.sleep(0.5)  # vLLM is healthy all along
            _, full = await get_json(http, f"{agent.url}/status")
            assert "READY" not in [t["to"] for t in full["history"]]
            assert full["drain"]["reason"] == "preemption"
            await meta.set("instance/preempted", "FALSE")  # a later value undoes nothing
            await asyncio.sleep(0.5)
            assert await state(http, agent) == "TERMINATED"
    finally:
        agent.kill()


async def test_host_maintenance_terminate_drains_the_node(tmp_path, servers) -> None:
    meta, vllm = servers
    agent = await start(tmp_path, meta, vllm)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: _is(http, agent, "READY"), 10)
            await meta.set("instance/maintenance-event", "TERMINATE_ON_HOST_MAINTENANCE")
            await until(lambda: _is(http, agent, "TERMINATED"), 10)
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["drain"]["reason"] == "maintenance"
            status, body = await _post(http, f"{agent.url}/resume")
            assert status == 409
    finally:
        agent.kill()


async def _is(http: aiohttp.ClientSession, agent: AgentProcess, expected: str) -> bool:
    return await state(http, agent) == expected


async def _post(http: aiohttp.ClientSession, url: str) -> tuple[int, object]:
    async with http.post(url) as resp:
        return resp.status, await resp.json()


async def test_restart_on_a_preempted_node_with_a_flaky_metadata_server_never_becomes_ready(tmp_path, servers) -> None:
    meta, vllm = servers
    await meta.set("instance/preempted", "TRUE")
    meta.inject("instance/preempted", "503", "503", "503")  # the first reads fail: unknown, not "safe"
    agent = await start(tmp_path, meta, vllm)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: _is(http, agent, "TERMINATED"), 20)
            _, full = await get_json(http, f"{agent.url}/status")
            assert "READY" not in [t["to"] for t in full["history"]]
    finally:
        agent.kill()
