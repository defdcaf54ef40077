"""Whole-node scenarios with every fake: vLLM serving completions, the GCE metadata
server and Cloud Monitoring, and the LB stand-in. Each asserts what users care
about: nothing sent to a node the LB held unready, every admitted request completed
or counted as aborted, the termination report written once, nothing exported twice."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import pytest

from agent.sim.metadata import FakeMetadataServer
from agent.sim.monitoring import FakeMetricService
from agent.sim.vllm import FakeVllm
from tests.e2e.lb import LoadBalancer
from tests.harness import AgentProcess, until

QUEUE = "custom.googleapis.com/vllm/queue_length"
REPORT = "custom.googleapis.com/agent/termination/count"


@pytest.fixture
async def node(tmp_path: Path):
    vllm, meta, sink = FakeVllm(), FakeMetadataServer(), FakeMetricService()
    vllm.ttft_s, vllm.tpot_s = 0.05, 0.02
    for server in (vllm, meta, sink):
        await server.start()
    agent = AgentProcess(tmp_path, {
        "GPU_AGENT_INFERENCE__BASE_URL": vllm.url,
        "GPU_AGENT_PREEMPTION__ENABLED": "true",
        "GPU_AGENT_PREEMPTION__WATCH_TIMEOUT_S": "2",
        "GCE_METADATA_HOST": meta.address,
        "GPU_AGENT_EXPORT__ENABLED": "true",
        "GPU_AGENT_EXPORT__ENDPOINT": sink.endpoint,
        "GPU_AGENT_EXPORT__INSECURE": "true",
        "GPU_AGENT_EXPORT__INTERVAL_S": "10",
        "GPU_AGENT_DRAIN__PROPAGATION_DELAY_S": "0.5",
    })
    agent.start()
    await agent.started()
    yield agent, vllm, meta, sink
    agent.kill()
    for server in (sink, meta, vllm):
        await server.stop()


def assert_exported_once(sink: FakeMetricService) -> None:
    per_series = Counter((p.key, p.end_wall) for p in sink.points)
    assert max(per_series.values()) == 1  # no point written twice
    last: dict = {}
    for point in sink.points:
        if point.key in last:
            assert point.end_wall - last[point.key] >= 5  # in order, >= 5 s apart
        last[point.key] = point.end_wall


async def test_cold_start_traffic_spot_preemption_drain_terminated(node) -> None:
    agent, vllm, meta, sink = node
    lb = LoadBalancer(f"{agent.url}/readyz", vllm.url, rate_rps=30)
    traffic = asyncio.create_task(lb.run(duration_s=5.0))
    await until(lambda: lb.out.completed >= 20, 10, what="traffic flowing after cold start")
    await meta.set("instance/preempted", "TRUE")
    await until(lambda: sink.series(REPORT), 15, 0.05, "termination report")
    out = await traffic
    assert out.admitted_while_unhealthy == 0
    assert out.failed == 0 and out.completed == out.admitted  # every admitted request completed
    report = sink.series(REPORT)[0]
    assert report.metric_labels == {"reason": "preemption", "outcome": "emptied"}
    assert agent.proc.poll() is None  # TERMINATED, waiting for its signal
    agent.send(signal.SIGTERM)
    assert await agent.exited(20) == 0
    assert len(sink.series(REPORT)) == 1
    assert_exported_once(sink)


async def test_monitoring_outage_across_a_preemption_still_delivers_the_report(node) -> None:
    agent, vllm, meta, sink = node
    await until(lambda: sink.series(QUEUE), 15, 0.05, "first push")
    sink.unavailable = True  # Cloud Monitoring goes down
    lb = LoadBalancer(f"{agent.url}/readyz", vllm.url, rate_rps=20)
    traffic = asyncio.create_task(lb.run(duration_s=3.0))
    await until(lambda: lb.out.completed >= 10, 10)
    await meta.set("instance/preempted", "TRUE")
    await asyncio.sleep(1.0)
    sink.unavailable = False  # back before the notice runs out
    await until(lambda: sink.series(REPORT), 25, 0.05, "report after the outage")
    out = await traffic
    assert out.failed == 0 and out.admitted_while_unhealthy == 0
    assert_exported_once(sink)


async def test_metadata_faults_under_traffic_cause_no_false_drain(node) -> None:
    agent, vllm, meta, sink = node
    lb = LoadBalancer(f"{agent.url}/readyz", vllm.url, rate_rps=20)
    traffic = asyncio.create_task(lb.run(duration_s=4.0))
    await until(lambda: lb.out.completed >= 5, 10)
    for fault in ("503", "reset", "reset", "garbage", "hang"):
        meta.inject("instance/preempted", fault)
    meta.inject("instance/maintenance-event", "503", "garbage")
    out = await traffic
    assert out.failed == 0 and out.admitted_while_unhealthy == 0
    assert out.healthy_changes == [out.healthy_changes[0]]  # healthy once, never taken out
    assert agent.proc.poll() is None
