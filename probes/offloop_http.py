"""OffLoopGet: bounded GETs to one server, sent and read on a dedicated thread with a
blocking socket. The contract of probes.http.get_capped (a deadline, a size cap, the
same failure codes) for the one GET whose send must not run on the event loop: the
vLLM scrape.

Why a thread: where vLLM shares CPUs with the agent, the scrape's request wakes vLLM
on the sending CPU and its render (5-13 ms of CPU for 4 engines) preempts the sender
inside send(). From the loop that was a 2-5 ms stall every second in which /readyz
could not answer (bench/bench_readyz.py's docstring has the measurement); here only
this thread waits. The deadline is kept on the loop: when it passes, the socket is
shut down under the thread, so the thread is never held longer than the deadline
(plus the socket timeouts, the second line), and a caller that is cancelled does the
same. One keep-alive connection is reused; a reused one the server had closed
(uvicorn closes idle ones after 5 s) is retried once on a new connection, as
urllib3 does for an idempotent GET.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import http.client
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from probes.base import FailureCode, ProbeError, http_code
from probes.http import forget_body

_CHUNK_BYTES = 64 * 1024
# A connection the server closed while idle: reading the answer finds EOF or a reset.
_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError)


@dataclass(eq=False)
class _Call:
    """One GET, shared by the loop (which may abort it) and the worker thread."""

    path: str
    headers: dict[str, str]
    what: str
    deadline: float  # time.monotonic()
    max_bytes: int
    lock: threading.Lock = field(default_factory=threading.Lock)
    aborted: bool = False
    sock: socket.socket | None = None

    def remaining_s(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise ProbeError(f"{self.what}: deadline passed", code=FailureCode.TIMEOUT)
        return left

    def attach(self, sock: socket.socket | None) -> None:
        """The socket the thread is about to block on; an aborted call never blocks."""
        with self.lock:
            self.sock = sock
            if self.aborted:
                raise ProbeError(f"{self.what}: abandoned", code=FailureCode.TIMEOUT)

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            sock = self.sock
        if sock is not None:
            # The thread's recv/send returns at once; OSError: the thread closed it already.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class OffLoopGet:
    """GETs under `base_url` (http or https), one at a time, on one worker thread
    (idle between calls; `close()` ends it)."""

    def __init__(self, base_url: str) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._https = url.scheme == "https"
        self._host = url.hostname
        self._port = url.port or (443 if self._https else 80)
        self._prefix = url.path.rstrip("/")
        self._conn: http.client.HTTPConnection | None = None  # touched by the worker thread only
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="offloop-http")
        self._current: _Call | None = None
        self._closed = False

    async def get(self, path: str, *, what: str, timeout_s: float, max_bytes: int, headers: dict[str, str]) -> bytes:
        """The body of a 200 to GET `path`, at most `max_bytes`; ProbeError otherwise."""
        if self._closed:
            raise ProbeError(f"{what}: the HTTP client is closed", code=FailureCode.CLOSED)
        call = _Call(self._prefix + path, headers, what, time.monotonic() + timeout_s, max_bytes)
        try:
            future = self._pool.submit(self._run, call)
        except RuntimeError:  # shut down by a close() that came first
            raise ProbeError(f"{what}: the HTTP client is closed", code=FailureCode.CLOSED) from None
        try:
            async with asyncio.timeout(timeout_s):
                return await asyncio.wrap_future(future)
        except TimeoutError:  # the thread turns its own timeouts into ProbeError: this is the loop's deadline
            call.abort()
            raise ProbeError(f"{what} did not answer within {timeout_s:g}s", code=FailureCode.TIMEOUT) from None
        except asyncio.CancelledError:
            call.abort()  # nothing of a cancelled call may go on running
            raise

    def close(self) -> None:
        """Abort the call in flight; the thread closes the connection and ends. Calls
        queued or made later fail (closed)."""
        if self._closed:
            return
        self._closed = True
        current = self._current
        if current is not None:
            current.abort()
        self._pool.submit(self._drop)  # on the thread that owns the connection, after what is queued
        self._pool.shutdown(wait=False)

    # The worker thread from here on.

    def _run(self, call: _Call) -> bytes:
        if self._closed:
            raise ProbeError(f"{call.what}: the HTTP client is closed", code=FailureCode.CLOSED)
        self._current = call
        try:
            reused = self._conn is not None and self._conn.sock is not None
            try:
                return self._exchange(call)
            except _STALE:
                if not reused:
                    raise
                self._drop()
                return self._exchange(call)  # once, on a new connection
        except ProbeError:
            self._drop()
            raise
        except ConnectionRefusedError:
            self._drop()
            why = f"{call.what}: connection refused (not listening: loading or stopped)"
            raise ProbeError(why, code=FailureCode.REFUSED) from None
        except TimeoutError:
            self._drop()
            raise ProbeError(f"{call.what} did not answer in time", code=FailureCode.TIMEOUT) from None
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            if call.aborted:
                raise ProbeError(f"{call.what}: abandoned at its deadline", code=FailureCode.TIMEOUT) from None
            raise ProbeError(f"{call.what}: {type(exc).__name__}: {exc}", code=FailureCode.CONNECTION) from None
        finally:
            self._current = None

    def _exchange(self, call: _Call) -> bytes:
        conn = self._connection(call)
        assert conn.sock is not None
        call.attach(conn.sock)
        conn.sock.settimeout(call.remaining_s())
        conn.request("GET", call.path, headers=call.headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise ProbeError(f"{call.what} answered {resp.status}", code=http_code(resp.status))
        if resp.length is not None and resp.length > call.max_bytes:
            raise ProbeError(f"{call.what} announces {resp.length} bytes, over {call.max_bytes}", code=FailureCode.TOO_LARGE)
        body = bytearray()
        try:
            while chunk := self._read(resp, call):
                if len(body) + len(chunk) > call.max_bytes:
                    raise ProbeError(f"{call.what} is over {call.max_bytes} bytes", code=FailureCode.TOO_LARGE)
                body += chunk
        except BaseException:
            forget_body(body)
            raise
        resp.close()  # read to the end: the connection is free for the next GET (or closed, if it said so)
        return bytes(body)

    @staticmethod
    def _read(resp: http.client.HTTPResponse, call: _Call) -> bytes:
        # call.sock, not conn.sock: http.client hands the socket to a response that will close it.
        assert call.sock is not None
        call.sock.settimeout(call.remaining_s())
        return resp.read1(_CHUNK_BYTES)  # at most one recv: the timeout bounds each step

    def _connection(self, call: _Call) -> http.client.HTTPConnection:
        if self._conn is None or self._conn.sock is None:
            self._drop()
            timeout = call.remaining_s()
            if self._https:
                conn: http.client.HTTPConnection = http.client.HTTPSConnection(
                    self._host, self._port, timeout=timeout, context=ssl.create_default_context()
                )
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            call.attach(None)
            self._conn = conn
            conn.connect()
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
