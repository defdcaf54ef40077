"""probes/http.py: the bounded GET every probe uses, against a real server on loopback:
the size cap (announced and streamed), the deadline, and the allocator hand-back after
an abandoned big body."""

from __future__ import annotations

import platform
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from probes.base import ProbeError
from probes.http import get_capped, release_free_memory
from tests.probes.bodies import announced, streamed

MB = 1024 * 1024


@pytest.fixture
async def server() -> AsyncIterator[str]:
    app = web.Application()
    app.router.add_get("/streamed", streamed)
    app.router.add_get("/announced", announced)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # the ephemeral port
    yield f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def get(session: aiohttp.ClientSession, url: str, *, max_bytes: int = 2 * MB, timeout_s: float = 5) -> bytes:
    return await get_capped(session, url, what="test body", timeout_s=timeout_s, max_bytes=max_bytes)


async def test_a_body_at_the_cap_comes_back_whole(server, session) -> None:
    body = await get(session, f"{server}/streamed?bytes={2 * MB}")
    assert body == b"x" * (2 * MB)


async def test_a_streamed_body_over_the_cap_is_too_large(server, session) -> None:
    with pytest.raises(ProbeError) as err:
        await get(session, f"{server}/streamed?bytes={2 * MB + 1}")
    assert err.value.code == "too_large" and "over 2097152 bytes" in str(err.value)
    # The connection was dropped, not left half-read: the next request works.
    assert await get(session, f"{server}/streamed?bytes=10") == b"x" * 10


async def test_an_announced_length_over_the_cap_is_refused_before_reading(server, session) -> None:
    with pytest.raises(ProbeError) as err:
        await get(session, f"{server}/announced?bytes={3 * MB}")
    assert err.value.code == "too_large" and "announces" in str(err.value)


async def test_the_deadline_cuts_a_slow_big_body(server, session) -> None:
    with pytest.raises(ProbeError) as err:
        await get(session, f"{server}/streamed?bytes={4 * MB}&pause_s=0.05", max_bytes=8 * MB, timeout_s=0.3)
    assert err.value.code == "timeout"


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_memory_can_be_handed_back_to_the_os() -> None:
    assert release_free_memory() is True
    assert release_free_memory() is True  # cheap to repeat: loaded once
