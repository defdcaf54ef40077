"""The listening socket, guarded against clients that misbehave: a cap on open
connections (the oldest idle ones are closed first), a short keep-alive, small
header limits, a byte budget per request head, and bad requests counted and logged
at a bounded rate instead of a traceback each.

Why: /readyz and /healthz are what load balancers, kubelet and the MIG autohealer
act on. Left to aiohttp's defaults, 1,000 idle connections use up a 1024-fd limit
(every later probe fails: autohealing recreates a healthy VM), idle keep-alives are
held for an hour, and a few clients sending megabyte headers grow the heap by
hundreds of MB (each rejected head leaves its read buffers in reference cycles).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_request import BaseRequest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger(__name__)

# Nothing this service answers needs more: probes and scrapes send a few hundred
# bytes of head, admin calls a bearer token and a small JSON body.
MAX_LINE_BYTES = 4096
MAX_FIELD_BYTES = 8190
MAX_HEADERS = 64
MAX_HEAD_BYTES = 64 * 1024  # unparsed bytes a connection may send before a request is complete
_LOG_EVERY_S = 10.0
_NEW_CONNECTION_S = 0.25  # a connection younger than this may still be sending its first request
_IN_USE_S = 1.0  # a keep-alive that carried a request this recently is in use
_COLLECT_AFTER_BAD = 32  # a rejected head's buffers sit in reference cycles: collect them soon
_TOO_LARGE = b"HTTP/1.1 431 Request Header Fields Too Large\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    max_connections: int = 256
    keepalive_timeout_s: float = 5.0


class ConnectionGuard:
    """Tracks the service's connections; closes one idle connection when a new one
    would exceed the cap, and counts what it refused.

    Connections are held in three insertion-ordered sets, so choosing whom to close
    costs the same whether 10 or 10,000 connect each second: not yet sent a request
    (oldest open first), used once, and in steady use (both least recently active
    first: a request moves its connection to the end)."""

    def __init__(self, limits: ConnectionLimits, *, clock: Any = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._fresh: dict[GuardedRequestHandler, None] = {}
        self._once: dict[GuardedRequestHandler, None] = {}
        self._steady: dict[GuardedRequestHandler, None] = {}
        self.closed: Counter[str] = Counter()  # why: idle_evicted, refused_busy
        self.bad_requests: Counter[str] = Counter()  # kind: malformed, too_large, handler_error
        self._suppressed: Counter[str] = Counter()
        self._last_logged: dict[str, float] = {}
        self._bad_since_collect = 0

    @property
    def open_connections(self) -> int:
        return len(self._fresh) + len(self._once) + len(self._steady)

    def now(self) -> float:
        return self._clock()

    def opened(self, handler: GuardedRequestHandler) -> None:
        if self.open_connections >= self.limits.max_connections and not self._evict_idle():
            # Every connection is busy with a request: refuse the new one rather than
            # run out of descriptors. (Our handlers answer in microseconds, so this
            # needs a flood of slow admin calls.)
            self.closed["refused_busy"] += 1
            asyncio.get_running_loop().call_soon(handler.force_close)
        self._fresh[handler] = None

    def requested(self, handler: GuardedRequestHandler) -> None:
        """A request head was parsed on `handler`: it moves to the end of its set."""
        self._discard(handler)
        (self._once if handler.requests_seen == 1 else self._steady)[handler] = None

    def closed_one(self, handler: GuardedRequestHandler) -> None:
        self._discard(handler)

    def _discard(self, handler: GuardedRequestHandler) -> None:
        for held in (self._fresh, self._once, self._steady):
            if handler in held:
                del held[handler]
                return

    def _evict_idle(self) -> bool:
        """Close one idle connection, in this order: one open a while that never sent a
        whole request (a slowloris, a connection opened and left), oldest first; then a
        keep-alive not used for a second, one used once before one in steady use, idle
        the longest first; then one that has only just arrived (a kubelet probe opens a
        new connection each time, and its request is on its way), oldest first; last,
        one in use (a load balancer's keep-alive, a client between two requests).

        In use comes after just arrived: when a slowloris's dropped connections come
        back together, every other connection has just arrived, and closing the one a
        client is using would fail its next request; a new connection that is really
        a probe sends its request long before 255 more connections arrive after it."""
        now = self._clock()
        fresh, once, steady = (next((h for h in held if not h.busy), None) for held in (self._fresh, self._once, self._steady))
        choices = (
            (fresh, fresh is not None and now - fresh.opened_at > _NEW_CONNECTION_S),
            (once, once is not None and now - once.last_active > _IN_USE_S),
            (steady, steady is not None and now - steady.last_active > _IN_USE_S),
            (fresh, True),
            (once, True),
            (steady, True),
        )
        victim = next((h for h, first in choices if h is not None and first), None)
        if victim is None:
            return False
        self._discard(victim)
        victim.force_close()
        self.closed["idle_evicted"] += 1
        return True

    def bad_request(self, kind: str, remote: str | None, detail: str, exc: BaseException | None = None) -> None:
        """Count it; log one line per kind every few seconds, saying how many were not
        logged in between (a traceback only for our own handler errors)."""
        self.bad_requests[kind] += 1
        now = self._clock()
        last = self._last_logged.get(kind)
        if last is not None and now - last < _LOG_EVERY_S:
            self._suppressed[kind] += 1
        else:
            log.log(
                logging.ERROR if kind == "handler_error" else logging.WARNING,
                "bad HTTP request",
                exc_info=exc,
                extra={"kind": kind, "remote": remote, "detail": detail[:200], "not_logged_since_last": self._suppressed[kind]},
            )
            self._last_logged[kind] = now
            self._suppressed[kind] = 0
        self._bad_since_collect += 1
        if self._bad_since_collect >= _COLLECT_AFTER_BAD:
            self._bad_since_collect = 0
            gc.collect()

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "gpu_node_agent_http_connections", "open connections to the agent's HTTP service", value=self.open_connections
        )
        closed = CounterMetricFamily(
            "gpu_node_agent_http_connections_closed", "connections the guard closed, by why", labels=["why"]
        )
        for why in ("idle_evicted", "refused_busy"):
            closed.add_metric([why], float(self.closed[why]))
        yield closed
        bad = CounterMetricFamily(
            "gpu_node_agent_http_bad_requests", "requests refused as malformed or too large", labels=["kind"]
        )
        for kind in ("malformed", "too_large", "handler_error"):
            bad.add_metric([kind], float(self.bad_requests[kind]))
        yield bad

    def describe(self) -> dict[str, Any]:
        return {
            "open": self.open_connections,
            "max_connections": self.limits.max_connections,
            "keepalive_timeout_s": self.limits.keepalive_timeout_s,
            "closed": dict(self.closed),
            "bad_requests": dict(self.bad_requests),
        }


class GuardedRequestHandler(web.RequestHandler):
    """aiohttp's protocol with the guard's hooks. `busy` and the head budget use two
    of aiohttp's private fields (`_request_in_progress`, `_request_count`);
    tests/service/test_connections.py fails if aiohttp changes them."""

    def __init__(self, manager: web.Server, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._guard = guard
        self._head_bytes = 0
        self._seen_requests = 0
        self._logged_by_us = False
        self._refused = False
        self.opened_at = self.last_active = guard.now()  # the connect, then each request head

    @property
    def requests_seen(self) -> int:
        return self._seen_requests

    @property
    def busy(self) -> bool:
        return bool(getattr(self, "_request_in_progress", False))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard.opened(self)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._guard.closed_one(self)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_force_close", False) or getattr(self, "_close", False):
            return  # already refused (or closing): the rest of the bytes are neither parsed nor counted
        self._head_bytes += len(data)
        if self._head_bytes > MAX_HEAD_BYTES:
            # Refused before the parser sees it: parsing a megabyte head costs far more.
            transport = self.transport
            self._refuse("too_large", f"over {MAX_HEAD_BYTES} bytes before a complete request")
            if transport is not None and not transport.is_closing():
                transport.write(_TOO_LARGE)
            self.force_close()
            return
        super().data_received(data)
        requests = getattr(self, "_request_count", 0)
        if requests != self._seen_requests:  # a request head was parsed: a new budget, and activity
            self._seen_requests, self._head_bytes = requests, 0
            self.last_active = self._guard.now()
            self._guard.requested(self)

    def _refuse(self, kind: str, detail: str) -> None:
        """Count a refused request once per connection: a head can trip the parser's
        limits and then the byte budget on the next read, before the connection closes."""
        if not self._refused:
            self._refused = True
            self._guard.bad_request(kind, _peer(self.transport), detail)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> web.StreamResponse:
        malformed = isinstance(exc, HttpProcessingError)
        if malformed:  # counted here: aiohttp logs a first garbage request (TLS, say) at debug only
            self._refuse("malformed", f"{type(exc).__name__}: {exc}")
        self._logged_by_us = malformed
        try:
            return super().handle_error(request, status, exc, message)
        finally:
            self._logged_by_us = False
            if exc is not None:
                exc.__traceback__ = None  # its frames hold the rejected read buffers

    def log_exception(self, *args: Any, **kw: Any) -> None:
        if self._logged_by_us:
            return
        exc = kw.get("exc_info")
        exc = exc if isinstance(exc, BaseException) else None
        # One of our handlers raised, or the connection broke mid-answer: worth a
        # traceback (rate-limited like the rest).
        self._guard.bad_request("handler_error", _peer(self.transport), f"{type(exc).__name__}: {exc}", exc)


def _peer(transport: asyncio.BaseTransport | None) -> str | None:
    peer = None if transport is None else transport.get_extra_info("peername")
    return None if not peer else str(peer[0])


class GuardedSite(web.BaseSite):
    """A TCP site whose connections are GuardedRequestHandlers (aiohttp's BaseSite is
    the documented way to bring your own listener)."""

    __slots__ = ("_guard", "_handler_kwargs", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard, *, backlog: int = 512) -> None:
        super().__init__(runner, backlog=backlog)
        self._host, self._port, self._guard = host, port, guard
        self._handler_kwargs = {
            "keepalive_timeout": guard.limits.keepalive_timeout_s,
            "max_line_size": MAX_LINE_BYTES,
            "max_field_size": MAX_FIELD_BYTES,
            "max_headers": MAX_HEADERS,
            "access_log": None,
            "lingering_time": 1.0,  # after an error answer, read what is left for 1 s, not 10
        }

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        loop = asyncio.get_running_loop()
        server = self._runner.server
        assert server is not None

        def protocol() -> GuardedRequestHandler:
            return GuardedRequestHandler(server, self._guard, loop=loop, **self._handler_kwargs)

        self._server = await loop.create_server(protocol, self._host, self._port, reuse_address=True, backlog=self._backlog)
