"""A real HAProxy in front of three nodes (fake vLLM + `gpu-node-agent run` each),
steady open-loop load through it, plain and SSE-streamed completions: a SIGTERM
rolling restart and a Spot preemption fail no request. This proves the agent's
drain works with a real load balancer's health checks, not only with our stand-in.
Each fake vLLM aborts what is in flight when it is stopped (vLLM's default
--shutdown-timeout 0), so a drain that ends too early shows as failed requests:
stopping vLLM right after HAProxy marks the node DOWN, without waiting for the
agent, failed 15-16 of ~350 requests (plain and streamed) when this was written.

The haproxy.cfg settings that matter (tests/e2e/haproxy.py):
- `option httpchk GET /readyz`, `http-check expect status 200`, `check port
  <agent port>`: traffic goes to vLLM, health comes from the agent, as in the fleet.
- `inter 100ms fall 2 rise 2`: a server is taken out about fall x inter after
  /readyz turns 503, so the agents' `drain.propagation_delay_s` (1 s here) covers
  it with room for a slow check; rise 2 puts a restarted node back quickly.
- `retries 0` and no `option redispatch`: a request sent to a node that is going
  away fails at the client instead of being retried elsewhere, so a loss shows.
- `timeout http-keep-alive` above the client's keep-alive: a failure can only
  come from a node, never from both ends closing one idle connection at once.
- No `on-marked-down shutdown-sessions`: requests in flight on a server marked
  DOWN run to completion, which is what the drain waits for.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.haproxy import Backend, HAProxy, haproxy_binary
from tests.e2e.load import Outcome, SteadyLoad
from tests.e2e.node import Node
from tests.harness import state_of, status_is, until

PROPAGATION_DELAY_S = 1.0  # HAProxy takes a server out after fall x inter = 0.2 s


@pytest.fixture
async def fleet(tmp_path: Path, session: aiohttp.ClientSession) -> AsyncIterator[tuple[list[Node], HAProxy]]:
    haproxy_binary()  # skip before starting anything where haproxy is absent
    nodes = [Node(tmp_path, f"node{i}", propagation_delay_s=PROPAGATION_DELAY_S) for i in range(3)]
    lb: HAProxy | None = None
    try:
        await asyncio.gather(*(node.start() for node in nodes))
        await asyncio.gather(*(node.ready(session) for node in nodes))
        # Started once every node is READY, so no check ever sees a warming node.
        lb = HAProxy(tmp_path, [Backend(n.name, n.vllm.port, n.agent_port) for n in nodes])
        await lb.start()
        for node in nodes:
            await lb.reaches(node.name, "UP")
        yield nodes, lb
    finally:
        if lb is not None:
            lb.stop()
        for node in nodes:
            await node.close()


def describe(failures: list[Outcome], lb: HAProxy) -> str:
    """The failed requests and HAProxy's own log lines, for the assertion message."""
    first = "\n".join(
        f"  {o.path} streamed={o.streamed} server={o.server} at {o.started_at:.3f}: {o.error}" for o in failures[:10]
    )
    return f"{len(failures)} failed requests:\n{first}\nhaproxy log (tail):\n{lb.log()[-4000:]}"


async def all_took_traffic(load: SteadyLoad, nodes: list[Node], after: float = 0.0, least: int = 5) -> None:
    await until(
        lambda: all(load.served_by(n.name, after=after) >= least for n in nodes),
        15,
        0.05,
        f"every node to serve {least} requests",
    )


async def terminated(session: aiohttp.ClientSession, node: Node) -> bool:
    return await state_of(session, node.agent) == "TERMINATED"


async def assert_load_ok(load: SteadyLoad, lb: HAProxy) -> None:
    errors = await lb.errors()
    print("load through haproxy:", load.summary(), "haproxy's errors:", errors)  # shown with -rP, and on failure
    assert not load.failures(), describe(load.failures(), lb)
    assert not any(errors.values()), errors  # HAProxy saw nothing fail and retried nothing
    assert load.count(lambda o: o.streamed) > 0 and load.count(lambda o: not o.streamed) > 0
    assert {o.path for o in load.outcomes} == {"/v1/completions", "/v1/chat/completions"}


async def test_sigterm_rolling_restart_behind_haproxy_fails_no_request(fleet: tuple[list[Node], HAProxy]) -> None:
    nodes, lb = fleet
    load = SteadyLoad(lb.url, rate_rps=40)
    marks: dict[str, tuple[float, float]] = {}  # node -> (SIGTERM sent, back UP)
    async with load.running():
        await all_took_traffic(load, nodes)
        for node in nodes:
            draining, sigterm_at = node.agent, time.monotonic()
            draining.send(signal.SIGTERM)
            down_after_s = await lb.reaches(node.name, "DOWN") - sigterm_at
            assert draining.proc.poll() is None  # out of the pool while the agent still drains
            assert await draining.exited(15) == 0
            await node.restart_vllm()
            await node.start_agent()
            marks[node.name] = (sigterm_at, await lb.reaches(node.name, "UP", 20))
            print(f"{node.name}: DOWN {down_after_s:.2f} s after SIGTERM, back UP after {marks[node.name][1] - sigterm_at:.2f} s")
        await all_took_traffic(load, nodes, after=max(up for _, up in marks.values()))
    await assert_load_ok(load, lb)
    for node in nodes:
        sigterm_at, up_at = marks[node.name]
        assert load.served_by(node.name, before=sigterm_at) > 0 and load.served_by(node.name, after=up_at) > 0
        report = node.agents[0].logs("agent stopping")[0]["termination_report"]
        print(f"{node.name} termination report:", report)
        assert report["reason"] == "signal" and report["outcome"] == "emptied" and report["aborted"] == 0, report
    # Requests were in flight on a node when its drain began, and still completed.
    spanning = load.count(lambda o: o.ok and o.started_at < marks[o.server][0] < o.finished_at)
    print("requests in flight on a node at its SIGTERM, all completed:", spanning)
    assert spanning > 0
    assert any(n.agents[0].logs("agent stopping")[0]["termination_report"]["in_flight_at_notice"] > 0 for n in nodes)


async def test_spot_preemption_behind_haproxy_fails_no_request(
    fleet: tuple[list[Node], HAProxy], session: aiohttp.ClientSession
) -> None:
    nodes, lb = fleet
    victim, others = nodes[1], [nodes[0], nodes[2]]
    load = SteadyLoad(lb.url, rate_rps=40)
    async with load.running():
        await all_took_traffic(load, nodes)
        notice_at = time.monotonic()
        await victim.metadata.set("instance/preempted", "TRUE")
        down_at = await lb.reaches(victim.name, "DOWN")
        print(f"{victim.name}: DOWN {down_at - notice_at:.2f} s after the notice")
        await until(lambda: terminated(session, victim), 20, 0.05, "victim TERMINATED")
        assert victim.agent.proc.poll() is None and await status_is(session, f"{victim.agent.url}/readyz", 503)
        await victim.power_off()  # GCE's hard stop, ~30 s after the notice
        off_at = time.monotonic()
        await all_took_traffic(load, others, after=off_at, least=10)
    await assert_load_ok(load, lb)
    assert (await lb.states())[victim.name] == "DOWN"
    assert load.served_by(victim.name, before=notice_at) > 0
    assert load.served_by(victim.name, after=down_at) == 0  # the other two took all traffic
    assert load.count(lambda o: o.started_at > down_at) == sum(load.served_by(n.name, after=down_at) for n in others)
    (drain,) = victim.agent.logs("drain finished")
    print(f"{victim.name} drain:", drain["drain"])
    assert (
        drain["drain"]["reason"] == "preemption" and drain["drain"]["outcome"] == "emptied" and drain["drain"]["aborted"] == 0
    ), drain
