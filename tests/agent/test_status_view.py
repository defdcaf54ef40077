"""`gpu-node-agent status` on real states of a real agent (subprocesses against the
fakes): the headline says state, why, for how long and what next; the warnings block
lists what needs a person; every line fits 100 columns with no Python reprs, and
counts are integers. Structure is pinned, not the volatile numbers."""

from __future__ import annotations

import json
import re

import aiohttp
import pytest

from agent.sim.metadata import FakeMetadataServer
from agent.status_view import render
from tests.agent.conftest import Launch
from tests.harness import AgentProcess, get_json, post_json, run_cli, sees_in_flight, until

REPRS = re.compile(r"[{}\[\]]|\b(True|False|None)\b|(?<![\d.])\d+\.0(?![\d.])")


async def shown(agent: AgentProcess) -> str:
    result = await run_cli("status", "--url", agent.url)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    text = result.stdout.rstrip("\n")
    for line in text.splitlines():
        assert len(line) <= 100, f"{len(line)} columns: {line}"
        assert not REPRS.search(line), f"a repr or a float count in: {line}"
    return text


async def when(session: aiohttp.ClientSession, agent: AgentProcess, predicate, what: str) -> None:
    async def check() -> bool:
        return predicate((await get_json(session, f"{agent.url}/status"))[1])

    await until(check, 15, 0.05, what)


def warnings_of(text: str) -> list[str]:
    """The items of the warnings block, each joined back into one string."""
    items: list[str] = []
    inside = False
    for line in text.splitlines():
        if line.startswith("warnings ("):
            inside = True
        elif inside and line.startswith("  ! "):
            items.append(line[4:])
        elif inside and line.startswith("    "):
            items[-1] += " " + line.strip()
        elif inside:
            break
    return items


async def test_ready_then_vllm_lost_then_admin_drained(launch: Launch, session, fake_vllm) -> None:
    agent = await launch()
    await when(session, agent, lambda s: s["state"] == "READY", "READY")
    fake_vllm.set_load(running=3, waiting=1)
    await until(lambda: sees_in_flight(session, agent), 5)
    text = await shown(agent)
    assert re.match(r"READY for [\d.]+ s, 4 in flight - serving; nothing to do\n", text)
    assert warnings_of(text) == []
    assert re.search(r"^vllm +4 in flight \(3 running, 1 waiting\)", text, re.MULTILINE)
    assert re.search(r"^gpus +not read \(gpu.enabled=false\)$", text, re.MULTILINE)

    fake_vllm.health_status = 503  # the engine died
    await when(session, agent, lambda s: s["state"] == "WARMING", "WARMING")
    text = await shown(agent)
    assert re.match(r"WARMING \(inference_lost\) for .+ - vLLM /health answered 503; check vLLM \(journalctl -u vllm\)\n", text)

    fake_vllm.health_status = 200
    fake_vllm.set_load(running=0)
    await when(session, agent, lambda s: s["state"] == "READY", "READY again")
    assert (await post_json(session, f"{agent.url}/drain", {"reason": "kernel upgrade"}))[0] == 202
    await when(session, agent, lambda s: (s["drain"] or {}).get("drained"), "drained")
    text = await shown(agent)
    assert re.match(r"DRAINING \(admin, drained\) for .+ - out of rotation; `gpu-node-agent resume` to serve again\n", text)
    assert "left" not in text and "deadline" not in text  # an admin drain has no deadline
    assert re.search(r"^drain +admin from admin_api, started \S+: kernel upgrade$", text, re.MULTILINE)
    assert "drain report" in text


async def test_export_failing_then_preemption_then_terminated(
    launch: Launch, session, fake_vllm, metadata_server: FakeMetadataServer
) -> None:
    agent = await launch(
        GPU_AGENT_EXPORT__ENABLED="true",
        GPU_AGENT_EXPORT__ENDPOINT="127.0.0.1:9",
        GPU_AGENT_EXPORT__INSECURE="true",
        GPU_AGENT_EXPORT__INTERVAL_S="10",
        GPU_AGENT_EXPORT__PROJECT_ID="demo-project",
        GPU_AGENT_EXPORT__RESOURCE="generic_node",
        GPU_AGENT_EXPORT__NODE_ID="node-a",
        GPU_AGENT_EXPORT__LOCATION="us-central1-a",
        GPU_AGENT_PREEMPTION__ENABLED="auto",
        GPU_AGENT_PREEMPTION__WATCH_TIMEOUT_S="2",
        GCE_METADATA_HOST=metadata_server.address,
        GPU_AGENT_DRAIN__PROPAGATION_DELAY_S="1",
    )
    await when(session, agent, lambda s: s["state"] == "READY" and s["exporter"].get("last_error"), "READY, export failing")
    text = await shown(agent)
    assert re.match(r"READY for [^,]+, \d+ in flight - serving; see the \d+ warning\(s\) below\n", text)
    export = [w for w in warnings_of(text) if "export to Cloud Monitoring failing (UNAVAILABLE)" in w]
    assert export, text
    assert re.search(r"^export +FAILING \(see the warnings\): 0 points written, last push never", text, re.MULTILINE)
    assert re.search(r"^metadata +http://127.0.0.1:\d+/computeMetadata/v1/ \(present\): watching preempted", text, re.MULTILINE)

    fake_vllm.set_load(running=2)
    await until(lambda: sees_in_flight(session, agent), 5)
    await metadata_server.set("instance/preempted", "TRUE")
    await when(session, agent, lambda s: s["state"] == "DRAINING", "preemption drain")
    text = await shown(agent)
    assert re.match(r"DRAINING \(preemption\) for [^,]+, \d+ s left, 2 in flight - nothing to do, the node is going away\n", text)

    fake_vllm.finish(2)
    await when(session, agent, lambda s: s["state"] == "TERMINATED", "TERMINATED")
    text = await shown(agent)
    assert re.match(r"TERMINATED \(preemption, emptied\) for .+ - nothing to do, the node is going away\n", text)
    assert re.search(
        r"^termination report\n  - preemption drain, emptied after [\d.]+ s, finished \d\d:\d\d:\d\dZ\n"
        r"  - requests: 2 in flight at the notice, 2 completed, 0 aborted$",
        text,
        re.MULTILINE,
    )
    machine = await run_cli("status", "--json", "--url", agent.url)
    assert json.loads(machine.stdout)["termination_report"]["completed"] == 2.0  # --json is the raw document


@pytest.fixture
async def ready_status(launch: Launch, session) -> dict:
    agent = await launch()
    await when(session, agent, lambda s: s["state"] == "READY", "READY")
    return (await get_json(session, f"{agent.url}/status"))[1]


def test_a_drain_not_on_disk_and_quarantined_state_files_are_warnings(ready_status) -> None:
    # The shape the agent gives state_file once it reports persistence (persisted, quarantined).
    ready_status["state_file"].update(persisted=False, quarantined=["/var/lib/gpu-node-agent/drain.json.bad-1"])
    found = warnings_of(render(ready_status))
    assert any("drain not persisted yet to" in w for w in found)
    assert any("drain.json.bad-1" in w for w in found)
    ready_status["state_file"].update(error="[Errno 30] Read-only file system", persisted=None, quarantined=[])
    assert any("drain not persisted: " in w and "Read-only file system" in w for w in warnings_of(render(ready_status)))
    ready_status["state_file"].update(
        error=None, persisted=True, writable=False, unwritable_reason="/var/lib/x: Read-only file system"
    )
    assert any("state dir not writable" in w and "Read-only" in w for w in warnings_of(render(ready_status)))


def test_an_older_agents_document_renders_without_the_keys_it_lacks(ready_status) -> None:
    for key in ("state_file", "exporter", "tasks", "gpu", "autoscaling", "process", "readiness", "preemption"):
        ready_status.pop(key)
    ready_status["readings"].pop("host", None)
    text = render(ready_status)
    assert text.startswith("READY for ") and "host        no data: no reading yet  (never read)" in text
