"""Fixtures several test packages share: a client session for talking to the servers
under test, and the fake vLLM and GCE metadata server on loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from agent.sim.metadata import FakeMetadataServer
from agent.sim.vllm import FakeVllm


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    # Bounded, so a server under test that hangs fails the test instead of stalling it.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        yield http


@pytest.fixture
async def metadata_server() -> AsyncIterator[FakeMetadataServer]:
    fake = FakeMetadataServer()
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVllm]:
    """A one-engine fake vLLM on loopback (tests that need another shape make their own)."""
    fake = FakeVllm()
    await fake.start()
    yield fake
    await fake.stop()
