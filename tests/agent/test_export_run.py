"""Export from a real `gpu-node-agent run` to a fake Cloud Monitoring on loopback:
regular pushes, the termination report on SIGTERM and on preemption, and a denied
project that is reported while the node keeps serving."""

from __future__ import annotations

import signal
from pathlib import Path

import aiohttp
import grpc
import pytest

from agent.sim.metadata import FakeMetadataServer
from agent.sim.monitoring import FakeMetricService
from agent.sim.vllm import FakeVllm
from tests.harness import AgentProcess, get_json, post_json, until

QUEUE = "custom.googleapis.com/vllm/queue_length"
DEMAND = "custom.googleapis.com/node/demand"
REPORT = "custom.googleapis.com/agent/termination/count"


@pytest.fixture
async def world():
    sink, vllm, meta = FakeMetricService(), FakeVllm(), FakeMetadataServer()
    await sink.start()
    await vllm.start()
    await meta.start()
    yield sink, vllm, meta
    await meta.stop()
    await vllm.stop()
    await sink.stop()


async def start(
    tmp_path: Path, sink: FakeMetricService, vllm: FakeVllm, meta: FakeMetadataServer | None = None, **extra: str
) -> AgentProcess:
    env = {
        "GPU_AGENT_INFERENCE__BASE_URL": vllm.url,
        "GPU_AGENT_EXPORT__ENABLED": "true",
        "GPU_AGENT_EXPORT__ENDPOINT": sink.endpoint,
        "GPU_AGENT_EXPORT__INSECURE": "true",
        "GPU_AGENT_EXPORT__INTERVAL_S": "10",
    }
    if meta is None:
        env.update(
            {
                "GPU_AGENT_EXPORT__PROJECT_ID": "demo-project",
                "GPU_AGENT_EXPORT__RESOURCE": "generic_node",
                "GPU_AGENT_EXPORT__NODE_ID": "node-a",
                "GPU_AGENT_EXPORT__LOCATION": "us-central1-a",
            }
        )
    else:
        env.update(
            {
                "GPU_AGENT_PREEMPTION__ENABLED": "auto",
                "GPU_AGENT_PREEMPTION__WATCH_TIMEOUT_S": "2",
                "GCE_METADATA_HOST": meta.address,
            }
        )
    env.update(extra)
    return await AgentProcess(tmp_path, env).start().started()


async def test_pushes_autoscaling_series_and_the_report_on_sigterm(tmp_path, world) -> None:
    sink, vllm, _ = world
    vllm.set_load(running=2, waiting=7)
    # The hand queue target (an [autoscaling] override) keeps the formula fixed here: this
    # test is about the lifecycle rule of what is pushed, not the self-calibrated gauge.
    agent = await start(tmp_path, sink, vllm, GPU_AGENT_AUTOSCALING__QUEUE_PER_NODE="10")
    try:
        await until(lambda: sink.series(QUEUE), 15, 0.05, "first push")
        point = sink.series(QUEUE)[-1]
        assert point.resource_type == "generic_node"
        assert point.resource_labels["node_id"] == "node-a"
        assert point.metric_labels == {}  # label-free: autoscalers sum one series per node
        demand = sink.series(DEMAND)[-1]
        state = next(
            p.metric_labels["state"]
            for p in sink.series("custom.googleapis.com/agent/state")
            if p.end_wall == demand.end_wall and p.value == 1
        )
        # 7 waiting / 10 per node while READY; a warming node writes 0 (capacity on its way)
        assert demand.value == (0.7 if state == "READY" else 0.0) and demand.metric_labels == {}
        async with aiohttp.ClientSession() as http:
            await until(lambda: _metric_is(http, agent, "gpu_node_agent_node_demand_ratio 0.7"), 10, 0.1, "demand on /metrics")
        # The raw autoscaling series follow the same rule, round by round: the queue is 0
        # in a WARMING round (capacity on its way) and the node's own 7 in a READY one.
        await until(lambda: any(p.value == 0.7 for p in sink.series(DEMAND)), 15, 0.1, "a READY round")
        for point in sink.series(DEMAND):
            queue = next(q.value for q in sink.series(QUEUE) if q.end_wall == point.end_wall)
            assert queue == (7 if point.value == 0.7 else 0), (point, queue)
        vllm.set_load(0, 0)
        agent.send(signal.SIGTERM)
        assert await agent.exited(20) == 0
    finally:
        agent.kill()
    reports = sink.series(REPORT)
    assert len(reports) == 1 and reports[0].metric_labels["reason"] == "signal"
    keys = [p.key for p in sink.points]
    stamps = {}
    for p in sink.points:  # never two points of one series within 5 s
        if p.key in stamps:
            assert p.end_wall - stamps[p.key] >= 5
        stamps[p.key] = p.end_wall
    assert len(keys) == len(sink.points)


async def test_report_arrives_at_preemption_before_any_signal(tmp_path, world) -> None:
    sink, vllm, meta = world
    agent = await start(
        tmp_path, sink, vllm, meta, GPU_AGENT_PREEMPTION__NOTICE_BUDGET_S="8", GPU_AGENT_DRAIN__SAFETY_MARGIN_S="2"
    )
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: sink.series(QUEUE), 15, 0.05, "first push")
            assert sink.series(QUEUE)[-1].resource_type == "gce_instance"
            assert sink.series(QUEUE)[-1].resource_labels["instance_id"] == "4520031799277581759"
            await meta.set("instance/preempted", "TRUE")
            await until(lambda: sink.series(REPORT), 10, 0.05, "termination report")
            assert agent.proc.poll() is None  # written while the node still waits for its signal
            report = sink.series(REPORT)[0]
            assert report.metric_labels["reason"] == "preemption"
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["state"] == "TERMINATED"
            assert full["exporter"]["points_written"] > 0
        agent.send(signal.SIGTERM)
        assert await agent.exited(20) == 0
    finally:
        agent.kill()
    assert len(sink.series(REPORT)) == 1  # the signal's flush did not write it again


async def test_permission_denied_is_explained_and_the_node_keeps_serving(tmp_path, world) -> None:
    sink, vllm, _ = world
    sink.deny("demo-project", grpc.StatusCode.PERMISSION_DENIED)
    agent = await start(tmp_path, sink, vllm)
    try:
        async with aiohttp.ClientSession() as http:

            async def explained() -> bool:
                _, full = await get_json(http, f"{agent.url}/status")
                return "PERMISSION_DENIED" in str(full["exporter"]) and full["state"] == "READY"

            await until(explained, 15, 0.1, "export error in /status")
            assert (await get_json(http, f"{agent.url}/readyz"))[0] == 200
            assert (await get_json(http, f"{agent.url}/healthz"))[0] == 200
            async with http.get(f"{agent.url}/metrics") as resp:
                assert "gpu_node_agent_export_failures_total" in await resp.text()
        assert any("PERMISSION_DENIED" in line for line in agent.output().splitlines())
    finally:
        agent.kill()


async def _metric_is(http: aiohttp.ClientSession, agent: AgentProcess, line: str) -> bool:
    async with http.get(f"{agent.url}/metrics") as resp:
        return line in (await resp.text()).splitlines()


async def test_with_preemption_watching_off_the_first_push_still_names_the_gce_instance(tmp_path, world) -> None:
    """Identity is read whenever export needs it: a MIG autoscaler on a per-instance
    metric sees nothing of series written on generic_node."""
    sink, vllm, meta = world
    agent = await start(tmp_path, sink, vllm, meta, GPU_AGENT_PREEMPTION__ENABLED="false")
    try:
        # The first push comes right away (not after a 30 s wait for an identity that never comes).
        await until(lambda: sink.series(QUEUE), 8, 0.05, "first push")
        point = sink.series(QUEUE)[0]
        assert point.resource_type == "gce_instance"
        assert point.resource_labels["instance_id"] == "4520031799277581759"
        assert point.resource_labels["zone"] == "us-central1-a"
        assert not [r for r in meta.served("instance/preempted") if r.query.get("wait_for_change")]  # no watch
        agent.send(signal.SIGTERM)
        assert await agent.exited(20) == 0
    finally:
        agent.kill()


async def test_reads_never_change_what_a_draining_node_exports(tmp_path, world) -> None:
    """/status and /metrics show the autoscaling values without moving them: what a
    draining node holds is the last READY *export round*, however often it was read."""
    sink, vllm, _ = world
    vllm.set_load(running=1, waiting=7)
    agent = await start(tmp_path, sink, vllm)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: any(p.value == 7 for p in sink.series(QUEUE)), 25, 0.05, "a READY round with 7 waiting")
            rounds = len(sink.series(QUEUE))
            vllm.set_load(running=1, waiting=2)  # still READY, but no round has written this
            for _ in range(50):
                await get_json(http, f"{agent.url}/status")
                async with http.get(f"{agent.url}/metrics") as resp:
                    await resp.read()
            assert len(sink.series(QUEUE)) == rounds, "an export round ran in between: the test lost its race"
            code, _ = await post_json(http, f"{agent.url}/drain", {"reason": "hold check"})
            assert code == 202
            await until(lambda: len(sink.series(QUEUE)) > rounds, 15, 0.05, "a DRAINING round")
            assert sink.series(QUEUE)[-1].value == 7  # held from the last READY round, not the 2 read since
            _, full = await get_json(http, f"{agent.url}/status")
            assert full["autoscaling"]["vllm/queue_length"] == 7
    finally:
        agent.kill()
