"""An open-loop load client: completions at a steady rate through a load balancer,
a fixed mix of plain and SSE-streamed, /v1/completions and /v1/chat/completions.
Every request's outcome is kept: status, the server that answered (HAProxy's
X-Served-By header), and for a stream whether it ended with `data: [DONE]`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import aiohttp

MODEL = "fake/llama-3-8b"
# (path, streamed): each request takes the next entry, so every kind runs all along.
MIX = [("/v1/completions", False), ("/v1/chat/completions", True), ("/v1/completions", True), ("/v1/chat/completions", False)]


@dataclass(frozen=True, slots=True)
class Outcome:
    path: str
    streamed: bool
    started_at: float  # time.monotonic()
    finished_at: float
    status: int | None
    server: str | None
    error: str | None  # None: a 200 with a whole answer

    @property
    def ok(self) -> bool:
        return self.error is None


class SteadyLoad:
    """`async with load.running():` sends `rate_rps` requests a second, whatever the
    answers take (open loop), until the block ends or `max_requests` were sent; the
    block's end waits for every request in flight."""

    def __init__(self, url: str, *, rate_rps: float = 40.0, max_requests: int = 3000, timeout_s: float = 10.0) -> None:
        self.url = url
        self.rate_rps = rate_rps
        self.max_requests = max_requests
        self.timeout_s = timeout_s
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SteadyLoad]:
        self._stop.clear()
        driver = asyncio.create_task(self._drive())
        try:
            yield self
        finally:
            self._stop.set()
            await driver

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]

    def summary(self) -> dict[str, int]:
        return {
            "requests": len(self.outcomes),
            "plain": self.count(lambda o: not o.streamed),
            "streamed": self.count(lambda o: o.streamed),
            "failed": len(self.failures()),
        }

    def count(self, keep: Callable[[Outcome], bool]) -> int:
        return sum(1 for o in self.outcomes if keep(o))

    def served_by(self, server: str, *, after: float = 0.0, before: float = float("inf")) -> int:
        """Successful requests `server` answered that were sent between `after` and `before`."""
        return self.count(lambda o: o.ok and o.server == server and after < o.started_at < before)

    async def _drive(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        async with aiohttp.ClientSession(timeout=timeout) as session, asyncio.TaskGroup() as requests:
            started = time.monotonic()
            for i in range(self.max_requests):
                # Each request has its slot on the clock: a slow answer delays no other.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, started + i / self.rate_rps - time.monotonic())):
                        await self._stop.wait()
                if self._stop.is_set():
                    return
                requests.create_task(self._one(session, *MIX[i % len(MIX)]))

    async def _one(self, session: aiohttp.ClientSession, path: str, streamed: bool) -> None:
        body = {"model": MODEL, "max_tokens": 16, "stream": streamed}
        body.update(
            {"messages": [{"role": "user", "content": "hello"}]} if path.endswith("/chat/completions") else {"prompt": "hello"}
        )
        started, status, server, error = time.monotonic(), None, None, None
        try:
            async with session.post(f"{self.url}{path}", json=body) as resp:
                status, server = resp.status, resp.headers.get("X-Served-By")
                if resp.status != 200:
                    error = f"HTTP {resp.status}: {(await resp.read())[:200]!r}"
                else:
                    error = await (_stream_error(resp) if streamed else _answer_error(resp))
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:  # ValueError: a body that is not JSON
            error = f"{type(exc).__name__}: {exc}"
        self.outcomes.append(Outcome(path, streamed, started, time.monotonic(), status, server, error))


async def _answer_error(resp: aiohttp.ClientResponse) -> str | None:
    answer = await resp.json()
    return None if answer.get("choices") else f"no choices in {answer!r}"


async def _stream_error(resp: aiohttp.ClientResponse) -> str | None:
    """None for a stream of JSON chunks that ends with `data: [DONE]`."""
    if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
        return f"not an event stream: {resp.headers.get('Content-Type')}"
    events = [line[len(b"data: ") :].strip() async for line in resp.content if line.startswith(b"data: ")]
    if not events or events[-1] != b"[DONE]":
        return f"stream ended without [DONE] after {len(events)} events"
    if len(events) < 2:
        return "stream had no chunk before [DONE]"
    for event in events[:-1]:
        json.loads(event)  # a cut or garbled chunk raises: that request failed
    return None
