"""Clients that misbehave against a real `gpu-node-agent run`: thousands of idle
connections under a 1024-fd limit, slowloris heads, megabyte headers. /readyz and
/healthz must keep answering, memory must stay put, and the log must not flood."""

from __future__ import annotations

import asyncio
import resource
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from agent.sim.vllm import FakeVllm
from service.connections import MAX_HEAD_BYTES
from tests.harness import AgentProcess, status_is, until

_LIMITED = (
    "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_NOFILE, ({n}, {n})); "
    "sys.argv = ['gpu-node-agent', 'run', '--config', sys.argv[1]]; runpy.run_module('agent', run_name='__main__')"
)


def client_fds(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < needed:
        pytest.skip(f"this test opens {needed} sockets; the hard open-file limit here is {hard}")
    if soft != resource.RLIM_INFINITY and soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed if hard == resource.RLIM_INFINITY else hard, hard))


async def start(tmp_path: Path, vllm: FakeVllm, *, fd_limit: int | None = None, **settings: str) -> AgentProcess:
    env = {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url, **{f"GPU_AGENT_{k.upper()}": v for k, v in settings.items()}}
    agent = AgentProcess(tmp_path, env)
    if fd_limit is not None:
        agent.argv = [sys.executable, "-c", _LIMITED.format(n=fd_limit), str(agent.config_path)]
    return await agent.start().started()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


async def answers_fast(http: aiohttp.ClientSession, url: str, within_s: float = 1.0) -> float:
    started = time.perf_counter()
    async with http.get(url, timeout=aiohttp.ClientTimeout(total=within_s)) as resp:
        await resp.read()
        assert resp.status in (200, 503), resp.status
    return time.perf_counter() - started


async def one_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/healthz") -> None:
    """A GET on a kept-alive connection, its answer read to the end."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: agent\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:"))
    await asyncio.wait_for(reader.readexactly(length), 5)


async def idle_keepalive(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
    """One full request, its answer read, then the connection held open idle."""
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return None
    try:
        await one_request(reader, writer)
        return reader, writer
    except (OSError, asyncio.IncompleteReadError, TimeoutError, StopIteration):
        writer.close()
        return None


async def test_two_thousand_idle_connections_under_a_1024_fd_limit_never_stop_the_probes(tmp_path, vllm) -> None:
    client_fds(2600)
    agent = await start(tmp_path, vllm, fd_limit=1024, service__keepalive_timeout_s="30")
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            for _ in range(20):  # 2,000 connections in waves, probing between waves
                opened = await asyncio.gather(*(idle_keepalive(agent.port) for _ in range(100)))
                held.extend(c for c in opened if c is not None)
                assert await answers_fast(http, f"{agent.url}/readyz") < 1.0
                assert await answers_fast(http, f"{agent.url}/healthz") < 1.0
            assert open_fds(agent.proc.pid) < 1024
            async with http.get(f"{agent.url}/metrics") as resp:
                text = await resp.text()
            assert 'gpu_node_agent_http_connections_closed_total{why="idle_evicted"}' in text
            evicted = float(text.split('gpu_node_agent_http_connections_closed_total{why="idle_evicted"} ')[1].split()[0])
            assert evicted >= 2000 - (1024 - 64)  # the cap sits below the fd limit
    finally:
        for _, writer in held:
            writer.close()
        agent.kill()


async def test_a_client_in_steady_use_keeps_its_connection_while_a_flood_is_evicted(tmp_path, vllm) -> None:
    """The cap closes slowloris and long-idle connections first: a load balancer's
    keep-alive health checks never see their connection reset under a flood."""
    agent = await start(tmp_path, vllm, service__keepalive_timeout_s="30")
    held: list[asyncio.StreamWriter] = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        steady = 0

        async def check_once() -> None:
            nonlocal steady
            await one_request(reader, writer)
            steady += 1

        for wave in range(8):  # 800 idle keep-alives and 400 slowloris heads, probing in between
            opened = await asyncio.gather(*(idle_keepalive(agent.port) for _ in range(100)))
            held.extend(w for c in opened if c is not None for w in [c[1]])
            for _ in range(50):
                _, half = await asyncio.open_connection("127.0.0.1", agent.port)
                half.write(b"GET /readyz HTTP/1.1\r\nHost: a")
                held.append(half)
            await check_once()  # the same connection, every wave
            await asyncio.sleep(0.05 * wave)
        assert steady == 8
        writer.close()
    finally:
        for w in held:
            w.close()
        agent.kill()


async def test_a_wave_of_new_half_sent_connections_never_evicts_a_keep_alive_in_use(tmp_path, vllm) -> None:
    """A slowloris whose dropped connections come back together: for a moment every
    connection but ours has only just arrived (and is protected as a probe that may
    still be sending). The keep-alive a client is using (a request every 20 ms) must
    not be the one closed to make room, and kubelet-style probes on new connections
    must keep answering. Before: the in-use keep-alive was closed in every wave."""
    client_fds(1400)
    agent = await start(tmp_path, vllm, service__keepalive_timeout_s="30")  # the cap: 256 connections
    held: list[asyncio.StreamWriter] = []
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        answered, failures = 0, []
        waves_done = asyncio.Event()

        async def steady_client() -> None:
            nonlocal answered
            while not waves_done.is_set():
                try:
                    await one_request(reader, writer, "/readyz")
                    answered += 1
                except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                    failures.append(repr(exc))
                    return
                await asyncio.sleep(0.02)

        async def half_sent() -> asyncio.StreamWriter | None:
            try:
                _, half = await asyncio.open_connection("127.0.0.1", agent.port)
            except OSError:
                return None
            half.write(b"GET /readyz HTTP/1.1\r\nHost: a")
            return half

        steady = asyncio.create_task(steady_client())
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as probes:
            for _ in range(4):  # each wave: 400 new connections at once, more than the cap
                for _ in range(4):
                    held.extend(w for w in await asyncio.gather(*(half_sent() for _ in range(100))) if w is not None)
                assert await answers_fast(probes, f"{agent.url}/healthz") < 1.0  # a new connection, like kubelet's
                await asyncio.sleep(0.5)  # the wave ages past "just arrived"
                for w in held:
                    w.close()
                held.clear()
        waves_done.set()
        await steady
        assert failures == [] and answered > 20, (failures, answered)
        writer.close()
    finally:
        for w in held:
            w.close()
        agent.kill()


async def test_idle_and_half_sent_connections_are_closed_after_the_keepalive_timeout(tmp_path, vllm) -> None:
    agent = await start(tmp_path, vllm, service__keepalive_timeout_s="1")
    try:
        idle = await idle_keepalive(agent.port)
        assert idle is not None
        reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
        writer.write(b"GET /readyz HTTP/1.1\r\nHost: a")  # slowloris: the head never ends
        await writer.drain()
        started = time.monotonic()
        assert await asyncio.wait_for(idle[0].read(), 5) == b""  # the server closed it
        assert await asyncio.wait_for(reader.read(), 5) == b""
        assert time.monotonic() - started < 3.0
        writer.close()
        idle[1].close()
    finally:
        agent.kill()


async def test_megabyte_headers_are_refused_before_parsing_memory_stays_and_the_log_does_not_flood(tmp_path, vllm) -> None:
    agent = await start(tmp_path, vllm)
    try:
        async with aiohttp.ClientSession() as http:
            await until(lambda: status_is(http, f"{agent.url}/readyz", 200), 10)
            before = rss_mb(agent.proc.pid)

            async def flood() -> list[bytes]:
                answers = []
                for _ in range(15):
                    reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
                    writer.write(b"GET /readyz HTTP/1.1\r\nHost: agent\r\nX-Big: " + b"b" * (1 << 20) + b"\r\n\r\n")
                    try:
                        await writer.drain()
                        answers.append(await asyncio.wait_for(reader.read(200), 5))
                    except (ConnectionError, TimeoutError):
                        answers.append(b"")
                    writer.close()
                return answers

            answers = [a for batch in await asyncio.gather(*(flood() for _ in range(8))) for a in batch]
            assert any(a.startswith(b"HTTP/1.1 431") for a in answers)
            assert not any(a.startswith(b"HTTP/1.1 200") for a in answers)
            assert await answers_fast(http, f"{agent.url}/readyz") < 1.0
            assert rss_mb(agent.proc.pid) - before < 30  # was +500 MB with aiohttp's defaults
            async with http.get(f"{agent.url}/metrics") as resp:
                text = await resp.text()
            refused = {
                kind: float(text.split(f'gpu_node_agent_http_bad_requests_total{{kind="{kind}"}} ')[1].split()[0])
                for kind in ("too_large", "malformed")
            }
            # Each of the 120 is refused and counted: over the head budget (431, before the
            # parser), or, when the first read is small enough to reach it, by the parser's
            # field limit (400); which one depends on how the kernel splits the bytes.
            assert refused["too_large"] >= 1 and refused["too_large"] + refused["malformed"] == 120, refused
        bad_lines = agent.logs("bad HTTP request")
        assert 1 <= len(bad_lines) <= 3  # rate-limited: one line per kind per 10 s
        assert "Traceback" not in agent.output()
    finally:
        agent.kill()


async def test_malformed_requests_get_400_are_counted_and_logged_without_traceback(tmp_path, vllm) -> None:
    agent = await start(tmp_path, vllm)
    try:
        tls_hello = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" * 10
        for garbage in (tls_hello, b"GET / HTTP/9.9\r\n\r\n", b"GET /readyz HTTP/1.1\r\nBad Header\r\n\r\n"):
            reader, writer = await asyncio.open_connection("127.0.0.1", agent.port)
            writer.write(garbage)
            await writer.drain()
            answer = await asyncio.wait_for(reader.read(200), 5)
            assert answer[9:12] == b"400", answer
            writer.close()
        async with aiohttp.ClientSession() as http:
            assert await answers_fast(http, f"{agent.url}/healthz") < 1.0
            async with http.get(f"{agent.url}/metrics") as resp:
                text = await resp.text()
        count = float(text.split('gpu_node_agent_http_bad_requests_total{kind="malformed"} ')[1].split()[0])
        assert count == 3
        assert "Traceback" not in agent.output()
    finally:
        agent.kill()


# --- what the guard relies on ---------------------------------------------------------
def test_the_private_aiohttp_fields_the_guard_reads_still_exist() -> None:
    """`busy` and the head budget read aiohttp's `_request_in_progress` and
    `_request_count`; if an upgrade renames them, this fails instead of the guard
    silently treating every connection as idle."""
    from aiohttp.web_protocol import RequestHandler

    assert {"_request_in_progress", "_request_count", "_force_close", "_close"} <= set(RequestHandler.__slots__)
    assert MAX_HEAD_BYTES >= 16 * 1024 + 8190  # an admin body plus a full head fit
