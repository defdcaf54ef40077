"""A fake GCE metadata server on loopback that speaks the real protocol (FIELD-NOTES
"GCE metadata server"): `Metadata-Flavor: Google` required, `X-Forwarded-For`
refused, an ETag on every answer, `wait_for_change` / `last_etag` / `timeout_sec`
hanging GETs, and upcoming-maintenance's 503 when no notice exists. Tests and the
demo flip values and inject faults (503s, connection resets, garbage, hangs)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp import web

PREFIX = "/computeMetadata/v1/"
PREEMPTED = "instance/preempted"
UPCOMING = "instance/upcoming-maintenance"
NO_NOTICE = "no notifications have been received yet, try again later"
_MAX_TIMEOUT_SEC = 3600
DEFAULTS = {
    PREEMPTED: "FALSE",
    "instance/maintenance-event": "NONE",
    "project/project-id": "demo-project",
    "project/numeric-project-id": "123456789012",
    "instance/id": "4520031799277581759",
    "instance/zone": "projects/123456789012/zones/us-central1-a",
    "instance/name": "gpu-node-1",
    "instance/hostname": "gpu-node-1.us-central1-a.c.demo-project.internal",
}


class Fault(StrEnum):
    UNAVAILABLE = "503"
    RESET = "reset"  # the transport is closed under the request
    GARBAGE = "garbage"  # 200 with bytes that are no value
    HANG = "hang"  # held until release_hangs() or stop()
    NO_ETAG = "no_etag"  # the value, without its ETag


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    at_mono: float = field(default_factory=time.monotonic)


class FakeMetadataServer:
    """`await start()`, point GCE_METADATA_HOST at `address`, then `set()` values and
    `inject()` faults; `requests` records what crossed the wire."""

    def __init__(
        self,
        values: dict[str, str] | None = None,
        *,
        restricted: bool = False,
        cluster: tuple[str, str] | None = None,
    ) -> None:
        self.values: dict[str, str] = {**DEFAULTS, **(values or {})}
        if cluster is not None:
            self.values["instance/attributes/cluster-name"] = cluster[0]
            self.values["instance/attributes/cluster-location"] = cluster[1]
        self.restricted = restricted  # GKE Workload Identity: instance/preempted is hidden (404)
        self.not_found: set[str] = set()  # paths this host does not offer (e.g. upcoming-maintenance)
        self.redirects: dict[str, str] = {}  # path -> path it answers 301 to (directories without a slash)
        self.faults: dict[str, deque[Fault]] = {}
        self.requests: list[RecordedRequest] = []
        self.port = 0
        self._changed = asyncio.Event()  # replaced on every change; waiters hold the old one
        self._release = asyncio.Event()
        self._parked: dict[str, list[web.Request]] = {}
        self._runner: web.AppRunner | None = None
        self._stopping = False

    @property
    def address(self) -> str:
        """What GCE_METADATA_HOST (or preemption.metadata_host) holds: host:port."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}{PREFIX}"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get(PREFIX + "{path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self._stopping = False
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._stopping = True
        self.release_hangs()
        self._wake()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def set(self, path: str, value: str | None) -> None:
        """Change (None: remove) a value; hanging GETs on it return at once."""
        if value is None:
            self.values.pop(path, None)
        else:
            self.values[path] = value
        self._wake()

    def inject(self, path: str, *faults: Fault | str, times: int = 1) -> None:
        """Queue faults for the next requests on `path`, in order (`times` repeats them)."""
        self.faults.setdefault(path, deque()).extend([Fault(f) for f in faults] * times)

    def release_hangs(self) -> None:
        self._release.set()
        self._release = asyncio.Event()

    def served(self, path: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == path]

    def parked(self, path: str) -> int:
        """How many hanging GETs on `path` are waiting for a change right now."""
        return len(self._parked.get(path, []))

    def reset_parked(self, path: str) -> int:
        """Drop the connections of the hanging GETs on `path` (a reset mid-wait)."""
        requests = list(self._parked.get(path, []))
        for request in requests:
            if request.transport is not None:
                request.transport.abort()
        self._wake()
        return len(requests)

    def etag(self, path: str) -> str:
        """Content-derived, like the real server's: the same value has the same ETag."""
        value = self.values.get(path, "\0absent")
        return hashlib.sha256(f"{path}\0{value}".encode()).hexdigest()[:16]

    # --- protocol ---------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.requests.append(RecordedRequest(path, dict(request.query), dict(request.headers)))
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing required header: Metadata-Flavor")
        if "X-Forwarded-For" in request.headers:
            return web.Response(status=403, text="Request had an X-Forwarded-For header and was rejected")
        queue = self.faults.get(path)
        if queue:
            return await self._fault(request, queue.popleft())
        if path in self.redirects:
            target = PREFIX + self.redirects[path] + (f"?{request.query_string}" if request.query_string else "")
            return web.Response(status=301, headers={"Location": target, "Metadata-Flavor": "Google"})
        missing = self._missing(path)
        if missing is not None:
            return missing
        if request.query.get("wait_for_change", "").lower() == "true":
            try:
                timeout_s = min(float(request.query.get("timeout_sec", _MAX_TIMEOUT_SEC)), _MAX_TIMEOUT_SEC)
            except ValueError:
                return web.Response(status=400, text="timeout_sec must be a number")
            await self._wait(request, path, request.query.get("last_etag") or self.etag(path), timeout_s)
            missing = self._missing(path)  # removed while waiting
            if missing is not None:
                return missing
        return self._answer(path, self.values[path], etag=True)

    def _missing(self, path: str) -> web.Response | None:
        if path in self.not_found or (self.restricted and path == PREEMPTED):
            return web.Response(status=404, text="Not Found")
        if path == UPCOMING and path not in self.values:
            return web.Response(status=503, text=NO_NOTICE)
        if path not in self.values:
            return web.Response(status=404, text="Not Found")
        return None

    async def _wait(self, request: web.Request, path: str, start_etag: str, timeout_s: float) -> None:
        """Return when the ETag differs from `start_etag` (at once if it already does),
        after `timeout_s`, when the connection is dropped, or when the server stops."""
        parked = self._parked.setdefault(path, [])
        parked.append(request)
        try:
            async with asyncio.timeout(timeout_s):
                while self.etag(path) == start_etag and not self._stopping and not _gone(request):
                    await self._changed.wait()
        except TimeoutError:
            pass  # timeout_sec elapsed: the unchanged value
        finally:
            parked.remove(request)

    def _answer(self, path: str, value: str | bytes, *, etag: bool) -> web.Response:
        headers = {"Metadata-Flavor": "Google", "Server": "Metadata Server for VM"}
        if etag:
            headers["ETag"] = self.etag(path)
        body = value.encode() if isinstance(value, str) else value
        return web.Response(body=body, headers=headers, content_type="application/text")

    async def _fault(self, request: web.Request, fault: Fault) -> web.StreamResponse:
        path = request.match_info["path"]
        if fault is Fault.UNAVAILABLE:
            return web.Response(status=503, text="Service Unavailable")
        if fault is Fault.GARBAGE:
            return self._answer(path, b"\xff\xfe<html>\x00oops", etag=True)
        if fault is Fault.NO_ETAG:
            return self._answer(path, self.values.get(path, ""), etag=False)
        if fault is Fault.HANG:
            await self._release.wait()
            return web.Response(status=503, text="released")
        assert request.transport is not None
        request.transport.abort()  # RESET: the client sees the connection drop mid-request
        return web.Response(status=500)

    def _wake(self) -> None:
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def describe(self) -> dict[str, Any]:
        return {"address": self.address, "restricted": self.restricted, "requests": len(self.requests)}


def _gone(request: web.Request) -> bool:
    return request.transport is None or request.transport.is_closing()


if __name__ == "__main__":  # python -m agent.sim.metadata: the fake on its own, to try the agent by hand
    from agent.sim.launcher import metadata_main

    raise SystemExit(metadata_main())
