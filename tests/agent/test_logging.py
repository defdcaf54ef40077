"""Logging never blocks the daemon: records go through a bounded queue to a writer
thread; a stdout nobody reads, or one closed at start, never stops /readyz, /healthz
or a clean exit."""

from __future__ import annotations

import asyncio
import fcntl
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import aiohttp

from agent import logs
from agent.sim.vllm import FakeVllm
from tests.harness import REPO, AgentProcess, status_is, until

_F_SETPIPE_SZ = 1031  # fcntl.F_SETPIPE_SZ, named in the module only from Python 3.10 on Linux


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]



async def ready(http: aiohttp.ClientSession, url: str) -> bool:
    try:
        return await status_is(http, f"{url}/readyz", 200)
    except (aiohttp.ClientError, TimeoutError):
        return False


def popen(tmp_path, vllm: FakeVllm, port: int, **kwargs) -> subprocess.Popen:
    env = AgentProcess(tmp_path, {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url}).env
    env.update({"GPU_AGENT_SERVICE__PORT": str(port), "GPU_AGENT_LOGGING__LEVEL": "DEBUG"})
    argv = [sys.executable, "-m", "agent", "run", "--config", str(tmp_path / "agent.toml")]
    (tmp_path / "agent.toml").write_text("")
    return subprocess.Popen(argv, cwd=REPO, env=env, **kwargs)


async def test_a_stdout_pipe_nobody_reads_never_stops_the_probes(tmp_path, vllm) -> None:
    port = free_port()
    agent = popen(tmp_path, vllm, port, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert agent.stdout is not None
    fcntl.fcntl(agent.stdout.fileno(), _F_SETPIPE_SZ, 4096)  # one page: full after a dozen lines
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            await until(lambda: ready(http, url), 15, 0.1, "READY")
            vllm.set_fault("hang", "metrics")  # a failing probe: a DEBUG line every poll, and more
            deadline = time.monotonic() + 4  # long past the point where the pipe is full
            while time.monotonic() < deadline:
                started = time.perf_counter()
                assert await status_is(http, f"{url}/readyz", 200)
                assert await status_is(http, f"{url}/healthz", 200)
                assert time.perf_counter() - started < 0.5
                await asyncio.sleep(0.1)
    finally:
        vllm.set_fault("ok")
        agent.kill()
        agent.wait(10)
        agent.stdout.close()


async def test_a_stdout_closed_at_start_still_ends_in_exit_0(tmp_path, vllm) -> None:
    port = free_port()
    agent = popen(tmp_path, vllm, port, stdout=None, stderr=subprocess.PIPE, preexec_fn=lambda: os.close(1))
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as http:
            await until(lambda: ready(http, url), 15, 0.1, "READY")
        agent.send_signal(signal.SIGTERM)
        await until(lambda: agent.poll() is not None, 20, 0.05, "exit")  # the fake vLLM keeps answering meanwhile
        assert agent.returncode == 0  # was SIGABRT: a socket reused fd 1 and uvloop asserted at exit
        assert agent.stderr.read() == b""
    finally:
        agent.kill()
        agent.wait(10)
        agent.stderr.close()


class BlockedStream(io.StringIO):
    """A stdout whose writes block until released (a pipe nobody reads)."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def write(self, text: str) -> int:
        self.release.wait(10)
        return super().write(text)


def test_records_that_do_not_fit_are_dropped_and_counted_never_blocking_the_caller() -> None:
    stream = BlockedStream()
    before = logs.LOG_STATS.dropped
    logs.configure_logging("INFO", "json", stream=stream)
    try:
        log = logging.getLogger("test.flood")
        started = time.perf_counter()
        for i in range(logs._QUEUE_RECORDS + 500):
            log.info("line %d", i)
        assert time.perf_counter() - started < 2.0  # never waited for the stuck writer
        assert logs.LOG_STATS.dropped - before >= 499
        stream.release.set()
        assert logs.stop_logging(timeout_s=10)
        lines = stream.getvalue().splitlines()
        assert lines[0].startswith('{"severity":"INFO","message":"line 0"')
    finally:
        stream.release.set()
        logs.stop_logging()
        logging.getLogger().handlers.clear()


def test_a_queued_record_keeps_its_traceback_and_the_state_at_the_time_it_was_logged() -> None:
    stream = io.StringIO()
    state = {"state": "READY", "reason": "inference_healthy"}
    logs.lifecycle_context.provider = lambda: dict(state)
    logs.configure_logging("INFO", "json", stream=stream)
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logging.getLogger("test.tb").exception("it broke", extra={"probe": "vllm"})
        state["state"] = "DRAINING"  # changes after the call: the line must still say READY
        assert logs.stop_logging(timeout_s=5)
        entry = json.loads(stream.getvalue().splitlines()[-1])
        assert entry["message"] == "it broke" and entry["probe"] == "vllm"
        assert entry["state"] == "READY"
        assert "ValueError: boom" in entry["exception"]
    finally:
        logs.lifecycle_context.provider = None
        logs.stop_logging()
        logging.getLogger().handlers.clear()

