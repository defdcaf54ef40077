"""A real `gpu-node-agent run` subprocess against a fake vLLM on loopback:
warm-up, readiness, signals, drains, admin calls and bad vLLM answers."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from agent.sim.vllm import FakeVllm
from tests.harness import (
    REPO,
    AgentProcess,
    get_json,
    post_json,
    sees_in_flight,
    state_of,
    status_is,
    until,
)


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


@pytest.fixture
def agents():
    started: list[AgentProcess] = []
    yield started
    for agent in started:
        agent.kill()


async def start_agent(agents: list, tmp_path: Path, vllm: FakeVllm, **settings: str) -> AgentProcess:
    env = {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}
    env.update({f"GPU_AGENT_{k.upper()}": v for k, v in settings.items()})
    agent = AgentProcess(tmp_path, env).start()
    agents.append(agent)
    return await agent.started()


async def wait_state(http: aiohttp.ClientSession, agent: AgentProcess, state: str, timeout_s: float = 10) -> None:
    async def check() -> bool:
        return await state_of(http, agent) == state

    await until(check, timeout_s, 0.05, f"state {state}")


async def test_warms_up_to_ready_only_once_vllm_answers(tmp_path, vllm, http, agents) -> None:
    await vllm.refuse()  # loading the model: the port refuses connections
    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "WARMING")
    status, body = await get_json(http, f"{agent.url}/readyz")
    assert status == 503 and body["state"] == "WARMING"
    _, full = await get_json(http, f"{agent.url}/status")
    assert full["readings"]["inference"]["value"]["code"] == "refused"
    await vllm.accept()
    await wait_state(http, agent, "READY")
    status, body = await get_json(http, f"{agent.url}/readyz")
    assert (status, body["ready"]) == (200, True)


async def test_vllm_dying_sends_node_back_to_warming_and_recovery_makes_it_ready(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "READY")
    vllm.health_status = 503  # engine died
    await wait_state(http, agent, "WARMING")
    _, body = await get_json(http, f"{agent.url}/readyz")
    assert body["reason"] == "inference_lost"
    vllm.health_status = 200
    await wait_state(http, agent, "READY")
    _, full = await get_json(http, f"{agent.url}/status")
    assert [t["to"] for t in full["history"]] == ["WARMING", "READY", "WARMING", "READY"]


async def test_sigterm_turns_readyz_503_at_once_keeps_healthz_and_exits_after_in_flight(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "READY")
    vllm.set_load(running=2, waiting=1)
    await until(lambda: sees_in_flight(http, agent), 5, what="agent sees in-flight")
    agent.send(signal.SIGTERM)
    await until(lambda: status_is(http, f"{agent.url}/readyz", 503), 2, 0.005, "503")
    assert await status_is(http, f"{agent.url}/healthz", 200)
    await asyncio.sleep(1.0)  # well past propagation + settle: still 3 in flight
    assert agent.proc.poll() is None
    _, full = await get_json(http, f"{agent.url}/status")
    assert full["state"] == "DRAINING" and full["drain"]["progress"]["in_flight_now"] == 3
    assert await status_is(http, f"{agent.url}/healthz", 200)
    vllm.finish(3)
    assert await agent.exited() == 0
    report = agent.logs("agent stopping")[0]["termination_report"]
    assert report["outcome"] == "emptied"
    assert report["in_flight_at_notice"] == 3
    assert report["completed"] == 3 and report["aborted"] == 0


async def test_deadline_with_work_running_exits_0_and_reports_aborted(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm, drain__timeout_s="1.5")
    await wait_state(http, agent, "READY")
    vllm.set_load(running=2)
    await until(lambda: sees_in_flight(http, agent), 5)
    agent.send(signal.SIGTERM)
    assert await agent.exited(10) == 0
    report = agent.logs("agent stopping")[0]["termination_report"]
    assert report["outcome"] == "deadline"
    assert report["aborted"] == 2
    assert 1.4 <= report["drain_s"] < 5


async def test_second_sigterm_skips_the_waiting(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm, drain__propagation_delay_s="60")
    await wait_state(http, agent, "READY")
    vllm.set_load(running=4)
    await until(lambda: sees_in_flight(http, agent), 5)
    agent.send(signal.SIGTERM)
    await wait_state(http, agent, "DRAINING")
    agent.send(signal.SIGTERM)
    assert await agent.exited(5) == 0
    report = agent.logs("agent stopping")[0]["termination_report"]
    assert report["outcome"] == "forced" and report["aborted"] == 4


async def test_admin_drain_from_loopback_and_resume(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "READY")
    status, body = await post_json(http, f"{agent.url}/drain", {"reason": "kernel upgrade"})
    assert status == 202 and body["state"] == "DRAINING"
    status, body = await get_json(http, f"{agent.url}/readyz")
    assert status == 503 and body["reason"] == "admin"
    status, body = await post_json(http, f"{agent.url}/drain", {"reason": "again", "wait": True, "timeout": 5})
    assert status == 200 and body["drained"] and body["started"] is False
    assert body["drain"]["detail"] == "kernel upgrade"
    status, body = await post_json(http, f"{agent.url}/resume")
    assert status == 200 and body["state"] in ("WARMING", "READY")  # a healthy vLLM may re-ready at once
    await wait_state(http, agent, "READY")
    _, full = await get_json(http, f"{agent.url}/status")
    assert [t["reason"] for t in full["history"]][-4:] == ["admin", "admin_drained", "resumed", "inference_healthy"]


async def test_admin_calls_with_a_token_file(tmp_path, vllm, http, agents) -> None:
    token = tmp_path / "admin-token"
    token.write_text("sekret")
    agent = await start_agent(agents, tmp_path, vllm, service__admin_token_file=str(token))
    await wait_state(http, agent, "READY")
    status, body = await post_json(http, f"{agent.url}/drain", {}, headers={"Authorization": "Bearer nope"})
    assert status == 403 and "wrong admin token" in body["error"]
    assert await state_of(http, agent) == "READY"
    status, _ = await post_json(http, f"{agent.url}/drain", {}, headers={"Authorization": "Bearer sekret"})
    assert status == 202
    status, _ = await post_json(http, f"{agent.url}/resume", headers={"Authorization": "Basic x"})
    assert status == 401
    status, _ = await post_json(http, f"{agent.url}/resume")  # loopback without a header is trusted
    assert status == 200


async def test_admin_drain_survives_a_restart(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "READY")
    assert (await post_json(http, f"{agent.url}/drain", {"reason": "hold for debugging"}))[0] == 202
    agent.kill()  # SIGKILL: nothing gets to clean up
    again = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, again, "DRAINING")
    await asyncio.sleep(0.5)  # vLLM is healthy, yet the node must not become ready
    status, body = await get_json(http, f"{again.url}/readyz")
    assert status == 503
    _, full = await get_json(http, f"{again.url}/status")
    assert full["drain"]["reason"] == "admin" and full["drain"]["detail"] == "hold for debugging"
    assert full["history"][0]["source"] == "state_file"
    assert (await post_json(http, f"{again.url}/resume"))[0] == 200
    await wait_state(http, again, "READY")
    assert not (tmp_path / "state" / "drain.json").exists()


async def test_an_agent_restarted_mid_preemption_keeps_the_notices_deadline(tmp_path, vllm, http, agents) -> None:
    from agent.state_file import current_boot_id

    agent = await start_agent(agents, tmp_path, vllm, drain__timeout_s="300", drain__propagation_delay_s="0")
    await wait_state(http, agent, "READY")
    agent.kill()
    # What the first life wrote when the notice came (20 s of it left), as the file holds it.
    record = {"reason": "preemption", "detail": "instance/preempted TRUE", "started_at_wall": time.time() - 10,
              "boot_id": current_boot_id(), "deadline_wall": time.time() + 20}
    (tmp_path / "state").mkdir(exist_ok=True)
    (tmp_path / "state" / "drain.json").write_text(json.dumps(record))
    vllm.set_load(running=1)  # never empties: only the deadline ends this drain
    again = await start_agent(agents, tmp_path, vllm, drain__timeout_s="300", drain__propagation_delay_s="0")
    _, full = await get_json(http, f"{again.url}/status")
    assert full["state"] == "DRAINING" and full["drain"]["reason"] == "preemption" and full["drain"]["terminal"]
    assert 10 < full["drain"]["deadline_in_s"] <= 20  # the notice's remainder, not a fresh 300 s


async def test_resume_refused_for_a_signal_drain(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm, drain__propagation_delay_s="30")
    await wait_state(http, agent, "READY")
    agent.send(signal.SIGTERM)
    await wait_state(http, agent, "DRAINING")
    status, body = await post_json(http, f"{agent.url}/resume")
    assert status == 409 and "signal drain" in body["error"]


_JSON = {"Content-Type": "application/json"}
BAD_ADMIN_CALLS = [
    # (path, headers, body, status, words in the error)
    ("/drain", _JSON, "not json", 400, "JSON object"),
    ("/drain", _JSON, '{"reason": 5}', 400, "reason"),
    ("/drain", _JSON, '{"wait": "maybe"}', 400, "wait"),
    ("/drain", _JSON, '{"timeout": -1}', 400, "timeout"),
    ("/drain", _JSON, '{"bogus": 1}', 400, "unknown field"),
    ("/drain", _JSON, "[1]", 400, "JSON object"),
    ("/drain", {"Content-Type": "application/json; charset=foobar"}, '{"reason": "x"}', 400, "unknown charset"),
    ("/drain", _JSON, '{"wait": true, "timeout": 1' + "0" * 400 + "}", 400, "timeout"),  # 10**400: was a 500
    ("/drain", _JSON, '{"wait": true, "timeout": 1e400}', 400, "timeout"),
    ("/drain", _JSON, "[" * 5000 + "]" * 5000, 400, "JSON object"),  # nesting bomb
    ("/drain", {"Content-Type": "text/plain"}, "reason=because", 415, "application/json"),
    ("/drain?reason=x&force=1", {}, "", 400, "unknown query parameter(s): force"),
    ("/resume", _JSON, '{"please": true}', 400, "unknown field"),
    ("/resume?now=1", {}, "", 400, "unknown query parameter(s): now"),
]


async def test_bad_admin_requests_get_a_4xx_with_a_reason_and_change_nothing(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm)
    for path, headers, body, status, expected in BAD_ADMIN_CALLS:
        async with http.post(f"{agent.url}{path}", data=body, headers=headers) as resp:
            answer = await resp.json()
            assert (resp.status, expected in answer["error"]) == (status, True), (path, body[:40], resp.status, answer)
    assert await state_of(http, agent) != "DRAINING"
    # An empty body is allowed whatever its Content-Type says.
    async with http.post(f"{agent.url}/drain", data=b"", headers={"Content-Type": "text/plain"}) as resp:
        assert resp.status == 202


@pytest.mark.parametrize(
    "fault, code",
    [
        ("garbage", "garbage"),
        ("truncated", "garbage"),
        ("oversized", "too_large"),
        ("hang", "timeout"),
        ("slow", "timeout"),
        ("http_500", "http_500"),
    ],
)
async def test_bad_vllm_metrics_are_dropped_marked_stale_and_explained(tmp_path, vllm, http, agents, fault, code) -> None:
    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "READY")
    vllm.set_fault(fault, target="metrics")

    async def explained() -> bool:
        _, full = await get_json(http, f"{agent.url}/status")
        reading = full["readings"]["vllm"]
        return reading["stale"] and reading["error_code"] == code and reading["error"]

    await until(explained, 8, 0.05, f"/status explains {code}")
    assert await state_of(http, agent) == "READY"  # metrics trouble alone does not flip readiness
    async with http.get(f"{agent.url}/metrics") as resp:
        text = await resp.text()
    assert 'gpu_node_agent_probe_errors_total{probe="vllm"}' in text
    assert 'gpu_node_agent_reading_stale{key="vllm"} 1.0' in text


async def test_idle_node_drains_and_runs_the_idle_action(tmp_path, vllm, http, agents) -> None:
    marker = tmp_path / "powered-off"
    config = f'[idle]\nafter_s = 1\naction = ["touch", "{marker}"]\n'
    agent = AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}, config_text=config).start()
    agents.append(agent)
    await agent.started()
    await until(lambda: marker.exists(), 15, 0.1, "idle action ran")
    _, full = await get_json(http, f"{agent.url}/status")
    assert full["state"] == "TERMINATED" and full["drain"]["reason"] == "idle"
    assert full["idle"]["action_result"]["returncode"] == 0
    assert (await get_json(http, f"{agent.url}/readyz"))[0] == 503


async def test_hanging_health_endpoint_makes_node_not_ready_and_says_why(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "READY")
    vllm.set_fault("hang", target="health")
    await wait_state(http, agent, "WARMING")
    _, full = await get_json(http, f"{agent.url}/status")
    assert full["readings"]["inference"]["value"]["code"] == "timeout"
    assert "failed in a row" in full["history"][-1]["detail"]


async def test_cli_drain_wait_returns_once_drained_and_status_renders(tmp_path, vllm, http, agents) -> None:
    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "READY")
    vllm.set_load(running=1)
    await until(lambda: sees_in_flight(http, agent), 5)

    async def a_ready_round_saw_it() -> bool:  # what a drain holds is the last READY round's
        return (await get_json(http, f"{agent.url}/status"))[1]["autoscaling"]["queue/pending_requests"] == 1.0

    await until(a_ready_round_saw_it, 5)
    cli = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agent",
        "drain",
        "--wait",
        "--timeout",
        "20",
        "--reason",
        "cli test",
        "--url",
        agent.url,
        "--json",
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    await wait_state(http, agent, "DRAINING")
    await asyncio.sleep(0.8)
    assert cli.returncode is None  # still waiting: one request in flight
    vllm.finish(1)
    out, err = await asyncio.wait_for(cli.communicate(), 15)
    assert cli.returncode == 0, err
    assert b'"drained": true' in out
    status = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--url", agent.url], cwd=REPO, capture_output=True, text=True, timeout=20
    )
    assert status.returncode == 0
    assert status.stdout.startswith("DRAINING (admin, drained)")
    # The node is empty now, but what it tells the autoscalers is held from its last READY
    # round (1 request in flight), so a drain does not read as demand going away.
    assert "queue/pending_requests 1," in " ".join(status.stdout.split()), status.stdout  # the line may wrap anywhere
    _, full = await get_json(http, f"{agent.url}/status")
    assert full["readings"]["vllm"]["value"]["in_flight"] == 0
    assert full["autoscaling"]["queue/pending_requests"] == 1.0


async def test_status_cli_says_when_the_agent_is_unreachable() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent", "status", "--url", "http://127.0.0.1:9"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 1
    assert "cannot reach the agent" in result.stderr


async def test_metrics_endpoint_speaks_prometheus_text(tmp_path, vllm, http, agents) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    agent = await start_agent(agents, tmp_path, vllm)
    await wait_state(http, agent, "READY")
    vllm.set_load(running=3, waiting=2)
    await until(lambda: sees_in_flight(http, agent), 5)
    async with http.get(f"{agent.url}/metrics") as resp:
        assert resp.status == 200
        families = {f.name: f for f in text_string_to_metric_families(await resp.text())}
    states = {s.labels["state"]: s.value for s in families["gpu_node_agent_state"].samples}
    assert states["READY"] == 1.0 and sum(states.values()) == 1.0
    assert families["gpu_node_agent_vllm_requests_waiting"].samples[0].value == 2
    assert families["gpu_node_agent_vllm_requests_running"].samples[0].value == 3
    transitions = {(s.labels["from"], s.labels["to"]) for s in families["gpu_node_agent_transitions"].samples}
    assert ("WARMING", "READY") in transitions


async def test_sigterm_long_after_vllm_died_ends_the_drain_in_propagation_plus_settle(tmp_path, vllm) -> None:
    """The metrics probe has backed off from the dead vLLM (up to 30 s); the drain reads
    vLLM itself, so it ends after the propagation delay and the settle time."""
    agent = await AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).start().started()
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            await vllm.refuse()  # vLLM is gone
            await asyncio.sleep(6)  # long enough for the probe's backoff to grow past 6 s
            started = time.monotonic()
            agent.send(signal.SIGTERM)
            assert await agent.exited(40) == 0
            assert time.monotonic() - started < 3.0  # propagation 0.3 + settle 0.3 + slack; was up to 30 s
        report = agent.logs("drain finished")[0]["drain"]
        assert report["outcome"] == "emptied"
    finally:
        agent.kill()
