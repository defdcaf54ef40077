"""`gpu-node-agent status|drain|resume` run as a user runs them (subprocesses), against a
real agent and fakes on loopback: usage errors exit 2 naming the flag before any request,
every failure is one line on stderr (never a traceback), answers are one sentence."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys

import aiohttp
import pytest

from agent import __version__, admin_client
from agent.config import DEFAULT_CONFIG_PATH, ServiceConfig
from agent.sim.metadata import FakeMetadataServer
from tests.agent.conftest import Launch
from tests.harness import REPO, AgentProcess, run_cli, sees_in_flight, state_of, until

HEAVY = ("pydantic", "pydantic_settings", "aiohttp", "prometheus_client", "google", "grpc", "uvloop", "psutil", "transitions")


def assert_one_clean_line(result: subprocess.CompletedProcess[str]) -> str:
    """The failure is one line on stderr, nothing on stdout, no traceback."""
    assert "Traceback" not in result.stdout + result.stderr
    assert result.stdout == ""
    assert result.stderr.startswith("gpu-node-agent")
    return result.stderr


async def ready(session: aiohttp.ClientSession, agent: AgentProcess) -> None:
    async def is_ready() -> bool:
        return await state_of(session, agent) == "READY"

    await until(is_ready, 10, 0.05, "READY")


@pytest.fixture
async def listener():
    """A TCP port that counts connections: proves a command made no request at all."""
    connections = []

    def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(accepted, "127.0.0.1", 0)
    yield f"127.0.0.1:{server.sockets[0].getsockname()[1]}", connections
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(
    "args, named",
    [
        (["drain", "--wait", "--timeout", "-1"], "--timeout -1"),
        (["drain", "--wait", "--timeout", "0"], "--timeout 0"),
        (["drain", "--wait", "--timeout", "nan"], "--timeout nan"),
        (["drain", "--wait", "--timeout", "90000"], "--timeout 90000"),
        (["drain", "--wait", "--timeout", "soon"], "--timeout: invalid float value: 'soon'"),
        (["drain", "--reason", ""], "--reason ''"),
        (["drain", "--reason", "   "], "--reason '   '"),
        (["drain", "--reason", "x" * 201], "--reason is 201 characters"),
        (["drain", "--timeout", "5"], "--timeout 5 applies only with --wait"),
        (["status", "--bogus"], "unrecognized arguments: --bogus"),
    ],
)
async def test_usage_errors_exit_2_naming_the_flag_and_value_before_any_request(args, named, listener) -> None:
    address, connections = listener
    result = await run_cli(*args, "--url", address)
    assert result.returncode == 2, result
    assert named in result.stderr and "Traceback" not in result.stderr and result.stdout == ""
    assert connections == []


@pytest.mark.parametrize("url", ["garbage", "ftp://127.0.0.1:8095", "127.0.0.1:99999", "127.0.0.1:http", "", "http://", "a b:1"])
async def test_a_url_that_is_not_host_port_is_a_usage_error_naming_url(url) -> None:
    result = await run_cli("status", "--url", url)
    assert result.returncode == 2
    assert f"--url {url!r}" in assert_one_clean_line(result)


@pytest.mark.parametrize("duration", ["2", "0", "-5", "nan", "100000"])
async def test_demo_duration_out_of_range_exits_2_naming_the_minimum(duration) -> None:
    result = await run_cli("demo", "--duration", duration)
    assert result.returncode == 2
    assert f"--duration {duration}" in assert_one_clean_line(result) and "at least 20 s" in result.stderr


async def test_an_unreachable_agent_names_the_url_and_the_next_step(listener) -> None:
    address, _ = listener  # listens, then closes at once: no HTTP answer
    for url in ("127.0.0.1:9", address):
        result = await run_cli("status", "--url", url)
        assert result.returncode == 1
        stderr = assert_one_clean_line(result)
        assert f"http://{url}/status" in stderr
        assert "systemctl status gpu-node-agent" in stderr and "--url" in stderr


async def test_a_url_that_is_not_the_agent_says_so(fake_vllm) -> None:
    result = await run_cli("status", "--url", fake_vllm.url)
    assert result.returncode == 1
    assert "answered HTTP 404" in assert_one_clean_line(result) and "is --url the agent's address?" in result.stderr


async def test_version() -> None:
    result = await run_cli("--version")
    assert (result.returncode, result.stdout.strip()) == (0, f"gpu-node-agent {__version__}")


async def test_every_url_form_reaches_the_same_agent(launch: Launch, session) -> None:
    agent = await launch()
    await ready(session, agent)
    for url in (f"127.0.0.1:{agent.port}", f"http://127.0.0.1:{agent.port}/status", f"http://127.0.0.1:{agent.port}/",
                f"localhost:{agent.port}/readyz"):
        result = await run_cli("status", "--url", url)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("READY for ")
    as_json = await run_cli("status", "--json", "--url", f"127.0.0.1:{agent.port}")
    assert json.loads(as_json.stdout)["state"] == "READY"


async def test_status_into_a_closed_pipe_exits_quietly(launch: Launch, session) -> None:
    agent = await launch()
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before a byte is written: `status | head -0`
    try:
        result = subprocess.run([sys.executable, "-m", "agent", "status", "--url", agent.url], cwd=REPO,
                                stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=20)
    finally:
        os.close(write_end)
    assert result.returncode == 0
    assert result.stderr == ""


async def test_a_broken_config_file_does_not_stop_status_it_says_which_port_it_used(launch: Launch, session, tmp_path) -> None:
    agent = await launch()
    broken = tmp_path / "broken.toml"
    broken.write_text("[service\nport = 1\n")
    result = await run_cli("status", "--config", str(broken), env={"GPU_AGENT_SERVICE__PORT": str(agent.port)})
    assert result.returncode == 0 and result.stdout.startswith(("READY", "WARMING"))
    assert f"cannot read the config file {broken}" in result.stderr and f"using port {agent.port}" in result.stderr
    typo = tmp_path / "typo.toml"
    typo.write_text(f"[service]\nprot = 9\nport = {agent.port}\n\n[inference]\nbase_url = 'nope'\n")
    result = await run_cli("status", "--config", str(typo))
    assert result.returncode == 0, result.stderr
    assert "unknown key(s) in [service]" in result.stderr and "prot" in result.stderr


async def test_drain_and_resume_answer_in_one_sentence_and_say_what_a_repeat_kept(launch: Launch, session) -> None:
    agent = await launch()
    await ready(session, agent)
    first = await run_cli("drain", "--reason", "kernel upgrade", "--url", agent.url)
    assert first.returncode == 0 and first.stderr == ""
    assert first.stdout.startswith("Drain started (admin: kernel upgrade)") and first.stdout.count("\n") == 1
    again = await run_cli("drain", "--reason", "something else", "--url", agent.url)
    assert "kept the first reason, not 'something else'" in again.stdout and again.returncode == 0
    machine = await run_cli("drain", "--json", "--url", agent.url)
    assert json.loads(machine.stdout)["started"] is False
    resumed = await run_cli("resume", "--url", agent.url)
    assert resumed.returncode == 0 and resumed.stdout.startswith("Resumed: the admin drain ended")
    await ready(session, agent)
    repeat = await run_cli("resume", "--url", agent.url)
    assert repeat.returncode == 0 and repeat.stdout.startswith("Nothing to resume: the node is not draining")


async def test_drain_wait_that_times_out_exits_1_and_says_the_drain_goes_on(launch: Launch, session, fake_vllm) -> None:
    agent = await launch()
    await ready(session, agent)
    fake_vllm.set_load(running=1)  # never finishes
    await until(lambda: sees_in_flight(session, agent), 5)
    result = await run_cli("drain", "--wait", "--timeout", "1", "--url", agent.url)
    assert result.returncode == 1
    assert "Not drained within 1 s (admin: admin drain (cli)); the drain goes on" in assert_one_clean_line(result)
    assert await state_of(session, agent) == "DRAINING"


async def test_a_drain_subsumed_by_a_preemption_says_so_and_resume_is_refused(
    launch: Launch, session, metadata_server: FakeMetadataServer
) -> None:
    agent = await launch(
        GPU_AGENT_PREEMPTION__ENABLED="auto",
        GPU_AGENT_PREEMPTION__WATCH_TIMEOUT_S="2",
        GCE_METADATA_HOST=metadata_server.address,
        GPU_AGENT_DRAIN__PROPAGATION_DELAY_S="30",
    )
    await ready(session, agent)
    await metadata_server.set("instance/preempted", "TRUE")

    async def draining() -> bool:
        return await state_of(session, agent) == "DRAINING"

    await until(draining, 5, 0.05, "preemption drain")
    result = await run_cli("drain", "--reason", "by hand", "--url", agent.url)
    assert result.returncode == 0
    assert result.stdout.startswith("Not started: a preemption drain is running") and "takes precedence" in result.stdout
    refused = await run_cli("resume", "--url", agent.url)
    assert refused.returncode == 1
    assert "Cannot resume: the drain is a preemption drain" in assert_one_clean_line(refused)


@pytest.mark.parametrize("command", [["status"], ["drain", "--reason", "imports"], ["resume"]])
async def test_client_commands_import_only_the_standard_library(launch: Launch, session, command) -> None:
    agent = await launch()
    await ready(session, agent)
    probe = (
        "import sys\nfrom agent.cli import main\n"
        f"code = main({[*command, '--url', agent.url]!r})\n"
        f"print('HEAVY', sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r}), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stderr


def test_the_client_defaults_mirror_the_config_model() -> None:
    # admin_client cannot import agent.config (pydantic): its copies must not drift.
    assert ServiceConfig.model_fields["port"].default == admin_client.DEFAULT_PORT
    assert admin_client.DEFAULT_CONFIG_PATH == DEFAULT_CONFIG_PATH
    assert set(ServiceConfig.model_fields) == admin_client.SERVICE_KEYS
