"""probes/offloop_http.py: the vLLM scrape's GET on its own thread, against a real
aiohttp server on loopback: get_capped's contract (cap, deadline, failure codes), one
reused keep-alive connection, a stale one retried once, and a deadline or a
cancellation that frees the thread at once."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from probes.base import ProbeError
from probes.offloop_http import OffLoopGet
from tests.probes.bodies import announced, streamed

MB = 1024 * 1024


@dataclass
class Server:
    url: str
    peers: list[tuple[str, int]] = field(default_factory=list)  # the client's address, per request
    paths: list[str] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def server() -> AsyncIterator[Server]:
    state = Server("")

    @web.middleware
    async def record(request: web.Request, handler):  # type: ignore[no-untyped-def]
        assert request.transport is not None
        state.peers.append(request.transport.get_extra_info("peername"))
        state.paths.append(request.path_qs)
        return await handler(request)

    async def hang(request: web.Request) -> web.Response:
        await state.release.wait()
        return web.Response(text="late")

    async def unavailable(request: web.Request) -> web.Response:
        return web.Response(status=503, text="loading")

    app = web.Application(middlewares=[record])
    for path, handler in (("/streamed", streamed), ("/announced", announced), ("/hang", hang), ("/503", unavailable)):
        app.router.add_get(path, handler)
        app.router.add_get("/prefix" + path, handler)
    runner = web.AppRunner(app, keepalive_timeout=0.3)  # uvicorn closes idle connections after 5 s
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    state.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
    yield state
    state.release.set()
    await runner.cleanup()


@pytest.fixture
def client(server: Server) -> Iterator[OffLoopGet]:
    made = OffLoopGet(server.url)
    yield made
    made.close()


async def get(client: OffLoopGet, path: str, *, max_bytes: int = 2 * MB, timeout_s: float = 5.0) -> bytes:
    return await client.get(path, what="test body", timeout_s=timeout_s, max_bytes=max_bytes, headers={"Accept": "text/plain"})


async def code_of(client: OffLoopGet, path: str, **kwargs: float) -> tuple[str, str]:
    with pytest.raises(ProbeError) as err:
        await get(client, path, **kwargs)  # type: ignore[arg-type]
    return err.value.code, str(err.value)


async def test_a_body_at_the_cap_comes_back_whole(server: Server, client: OffLoopGet) -> None:
    assert await get(client, f"/streamed?bytes={2 * MB}") == b"x" * (2 * MB)


async def test_a_streamed_body_over_the_cap_is_too_large_and_the_next_get_works(server: Server, client: OffLoopGet) -> None:
    code, why = await code_of(client, f"/streamed?bytes={2 * MB + 1}")
    assert code == "too_large" and "over 2097152 bytes" in why
    assert await get(client, "/streamed?bytes=10") == b"x" * 10


async def test_an_announced_length_over_the_cap_is_refused_before_reading(server: Server, client: OffLoopGet) -> None:
    code, why = await code_of(client, f"/announced?bytes={3 * MB}")
    assert code == "too_large" and "announces" in why


async def test_an_answer_other_than_200_is_its_http_code(server: Server, client: OffLoopGet) -> None:
    assert (await code_of(client, "/503"))[0] == "http_503"
    assert await get(client, "/announced?bytes=3") == b"yyy"  # and the client goes on


async def test_nothing_listening_is_refused() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # bound, never listening: connect() is refused
        closed = OffLoopGet(f"http://127.0.0.1:{port}")
        try:
            assert (await code_of(closed, "/metrics"))[0] == "refused"
        finally:
            closed.close()


async def test_the_deadline_cuts_a_slow_big_body(server: Server, client: OffLoopGet) -> None:
    code, _ = await code_of(client, f"/streamed?bytes={4 * MB}&pause_s=0.05", max_bytes=8 * MB, timeout_s=0.3)
    assert code == "timeout"


async def test_a_hanging_server_is_abandoned_at_the_deadline_and_frees_the_thread(server: Server, client: OffLoopGet) -> None:
    started = time.monotonic()
    code, _ = await code_of(client, "/hang", timeout_s=0.3)
    assert code == "timeout" and time.monotonic() - started < 0.8
    # The one worker thread is free at once (the socket was shut down under it), not
    # after the socket's own timeout: the next GET is answered straight away.
    started = time.monotonic()
    assert await get(client, "/announced?bytes=2", timeout_s=5.0) == b"yy"
    assert time.monotonic() - started < 0.5


async def test_a_cancelled_get_frees_the_thread(server: Server, client: OffLoopGet) -> None:
    task = asyncio.ensure_future(get(client, "/hang", timeout_s=30.0))
    while "/hang" not in server.paths:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    started = time.monotonic()
    assert await get(client, "/announced?bytes=1") == b"y"
    assert time.monotonic() - started < 0.5


async def test_one_keep_alive_connection_is_reused(server: Server, client: OffLoopGet) -> None:
    for _ in range(3):
        assert await get(client, "/announced?bytes=4") == b"yyyy"
    assert len(set(server.peers)) == 1 and len(server.peers) == 3


async def test_a_keep_alive_connection_the_server_closed_is_retried_once_on_a_new_one(server: Server, client: OffLoopGet) -> None:
    assert await get(client, "/announced?bytes=1") == b"y"
    await asyncio.sleep(0.6)  # past the server's keep-alive timeout: it closed the idle connection
    assert await get(client, "/announced?bytes=2") == b"yy"
    assert len(set(server.peers)) == 2 and len(server.peers) == 2  # the stale one never reached a handler


async def test_a_server_dropping_a_new_connection_is_a_connection_error_tried_once() -> None:
    accepted = 0

    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal accepted
        accepted += 1
        writer.close()

    slammer = await asyncio.start_server(slam, "127.0.0.1", 0)
    client = OffLoopGet(f"http://127.0.0.1:{slammer.sockets[0].getsockname()[1]}")
    try:
        assert (await code_of(client, "/metrics"))[0] == "connection"
        assert accepted == 1
    finally:
        client.close()
        slammer.close()
        await slammer.wait_closed()


async def test_a_path_under_the_base_url_keeps_its_prefix(server: Server) -> None:
    prefixed = OffLoopGet(server.url + "/prefix/")
    try:
        assert await get(prefixed, "/announced?bytes=1") == b"y"
        assert server.paths == ["/prefix/announced?bytes=1"]
    finally:
        prefixed.close()


async def test_after_close_a_get_fails_closed_and_close_can_be_repeated(server: Server) -> None:
    closing = OffLoopGet(server.url)
    assert await get(closing, "/announced?bytes=1") == b"y"
    closing.close()
    closing.close()
    assert (await code_of(closing, "/announced?bytes=1"))[0] == "closed"


def test_only_http_urls_are_taken() -> None:
    with pytest.raises(ValueError, match="not an http"):
        OffLoopGet("unix:///run/vllm.sock")
