"""bench/loadgen.c, the C open-loop driver the /readyz benches measure with: it builds,
sends what the rate asks for, and its own tail against a bare aiohttp app is small."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time

import pytest
from aiohttp import web

from bench import loadgen

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed: the C load driver cannot be built")

RATE_PER_S = 500
DURATION_S = 1.0


@pytest.fixture
async def bare_app_url(aiohttp_server):  # type: ignore[no-untyped-def]
    app = web.Application()

    async def ok(_request: web.Request) -> web.Response:
        return web.json_response({"state": "READY", "ready": True})

    async def missing(_request: web.Request) -> web.Response:
        return web.Response(status=503, text="not ready")

    app.router.add_get("/readyz", ok)
    app.router.add_get("/down", missing)
    server = await aiohttp_server(app)
    return f"http://127.0.0.1:{server.port}"


async def test_driver_sends_rate_times_duration_and_reads_every_answer(bare_app_url: str) -> None:
    result = await loadgen.drive(f"{bare_app_url}/readyz", RATE_PER_S, DURATION_S, connections=4)
    expected = int(RATE_PER_S * DURATION_S)
    assert abs(result.requests - expected) <= 2
    assert result.count == result.ok == result.requests
    assert result.errors == 0 and not any(result.errors_by.values())
    assert result.p50_ms is not None and result.p99_ms is not None and result.max_ms is not None
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms


async def test_a_server_stall_shows_in_every_request_due_during_it(aiohttp_server) -> None:  # type: ignore[no-untyped-def]
    """Open loop: latency runs from each request's due time, so a 300 ms stall of the
    server's loop delays every request due in it, not only the few on the wire (a
    closed-loop driver, coordinated omission, would show ~4 slow answers). No absolute
    time is asserted: a slower machine only makes more answers slow."""
    stalled = False

    async def ok(_request: web.Request) -> web.Response:
        nonlocal stalled
        if not stalled and asyncio.get_running_loop().time() > started + 0.3:
            stalled = True
            time.sleep(0.3)  # blocks this loop: the server stops answering
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/readyz", ok)
    server = await aiohttp_server(app)
    started = asyncio.get_running_loop().time()
    result = await loadgen.drive(
        f"http://127.0.0.1:{server.port}/readyz", RATE_PER_S, DURATION_S, connections=4, keep_latencies=True
    )
    assert stalled and result.errors == 0
    slow = [ms for ms in result.latencies_ms if ms >= 50]
    # Due in the stall's first 250 ms at 500/s: ~125 requests waited 50 ms or more.
    assert len(slow) >= 60, len(slow)
    assert result.max_ms is not None and result.max_ms >= 250


async def test_kept_latencies_are_every_answer_sorted_and_give_the_same_percentiles(bare_app_url: str) -> None:
    result = await loadgen.drive(f"{bare_app_url}/readyz", RATE_PER_S, 0.5, connections=4, keep_latencies=True)
    kept = result.latencies_ms
    assert len(kept) == result.count == 250
    assert list(kept) == sorted(kept) and kept[0] > 0
    assert kept[-1] == pytest.approx(result.max_ms, abs=1e-3)
    assert kept[len(kept) // 2] == pytest.approx(result.p50_ms, rel=0.2, abs=0.05)
    plain = await loadgen.drive(f"{bare_app_url}/readyz", 100, 0.2, connections=2)
    assert plain.latencies_ms == ()


async def test_non_2xx_answers_are_counted_as_errors_with_their_latency(bare_app_url: str) -> None:
    result = await loadgen.drive(f"{bare_app_url}/down", 100, 0.5, connections=2)
    assert result.count == result.requests == 50
    assert result.ok == 0 and result.errors == 50 and result.errors_by["status"] == 50
    assert result.p99_ms is not None


async def test_nothing_listening_is_connect_errors_not_a_hang(unused_tcp_port: int) -> None:
    result = await loadgen.drive(f"http://127.0.0.1:{unused_tcp_port}/readyz", 100, 0.3, connections=2, timeout_s=1)
    assert result.requests == 30
    assert result.ok == 0 and result.count == 0
    assert result.errors == 30 and result.errors_by["connect"] + result.errors_by["unsent"] == 30
    assert result.p99_ms is None


def test_binary_is_rebuilt_only_when_the_source_changes() -> None:
    first = loadgen.binary()
    assert first.exists() and first.parent == loadgen.BUILD_DIR
    assert loadgen.binary() == first


async def test_a_request_crossing_a_server_side_keep_alive_close_is_retried_once_not_an_error() -> None:
    """The server answers the first request of each connection, then closes the
    connection when the next one arrives, without a byte: what a keep-alive timeout
    firing as a request goes out looks like from the client."""
    connections = 0

    async def one_answer_each(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")
        await writer.drain()
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            await reader.readuntil(b"\r\n\r\n")  # the next request: dropped unanswered
        writer.close()

    server = await asyncio.start_server(one_answer_each, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        result = await loadgen.drive(f"http://127.0.0.1:{port}/readyz", 100, 0.5, connections=2)
    finally:
        server.close()
        await server.wait_closed()
    assert result.requests == result.ok == 50 and result.errors == 0
    # Every request after a connection's first went out on a reused connection and
    # was retried on a new one (the retry is never itself retried).
    assert result.retried >= 40 and connections >= 50
