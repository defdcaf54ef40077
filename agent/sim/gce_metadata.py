"""A fake GCE metadata server on loopback that speaks the real protocol:
`Metadata-Flavor: Google` required, `X-Forwarded-For` refused, an ETag on every
answer, `wait_for_change` / `last_etag` / `timeout_sec` hanging GETs, and the
upcoming-maintenance 503 when there is no notice. Tests and the demo flip values
and inject faults (503s, connection resets, garbage, hangs)."""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Any

from aiohttp import web

PREFIX = "/computeMetadata/v1/"
NO_NOTICE = "no notifications have been received yet, try again later"
DEFAULTS = {
    "instance/preempted": "FALSE",
    "instance/maintenance-event": "NONE",
    "project/project-id": "demo-project",
    "project/numeric-project-id": "123456789012",
    "instance/id": "4520031799277581759",
    "instance/zone": "projects/123456789012/zones/us-central1-a",
    "instance/hostname": "gpu-node-1.us-central1-a.c.demo-project.internal",
    "instance/name": "gpu-node-1",
}


@dataclass
class Recorded:
    path: str
    query: dict[str, str]
    headers: dict[str, str]


class FakeMetadataServer:
    def __init__(self, values: dict[str, str] | None = None, *, restricted: bool = False) -> None:
        self.values: dict[str, str] = {**DEFAULTS, **(values or {})}
        self.restricted = restricted  # GKE Workload Identity: instance/preempted is hidden (404)
        self.faults: dict[str, list[str]] = {}  # path -> queue of "503", "reset", "garbage", "hang"
        self.requests: list[Recorded] = []
        self.port = 0
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self._stopping = asyncio.Event()

    @property
    def address(self) -> str:
        """What GCE_METADATA_HOST holds: host:port."""
        return f"127.0.0.1:{self.port}"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get(PREFIX + "{path:.*}", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port, reuse_address=True)
        await site.start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        self._stopping.set()
        async with self._changed:
            self._changed.notify_all()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def set(self, path: str, value: str | None) -> None:
        """Change (or with None remove) a value; hanging GETs on it return at once."""
        if value is None:
            self.values.pop(path, None)
        else:
            self.values[path] = value
        async with self._changed:
            self._changed.notify_all()

    def inject(self, path: str, *faults: str) -> None:
        """Queue faults for the next requests on `path`: 503, reset, garbage, hang."""
        self.faults.setdefault(path, []).extend(faults)

    def served(self, path: str) -> list[Recorded]:
        return [r for r in self.requests if r.path == path]

    def _etag(self, path: str) -> str:
        value = self.values.get(path, "\0absent")
        return hashlib.sha1(f"{path}={value}".encode()).hexdigest()[:16]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        path = request.match_info["path"]
        self.requests.append(Recorded(path, dict(request.query), dict(request.headers)))
        if request.headers.get("Metadata-Flavor") != "Google":
            return web.Response(status=403, text="Missing required header: Metadata-Flavor")
        if "X-Forwarded-For" in request.headers:
            return web.Response(status=403, text="Request had an X-Forwarded-For header and was rejected")
        fault = self.faults.get(path, []).pop(0) if self.faults.get(path) else None
        if fault is not None:
            return await self._fault(request, fault)
        if request.query.get("wait_for_change", "").lower() == "true":
            await self._wait(path, request.query)
        return self._answer(path)

    async def _wait(self, path: str, query: Any) -> None:
        try:
            timeout_s = float(query.get("timeout_sec", "300"))
        except ValueError:
            timeout_s = 300.0
        start_etag = query.get("last_etag") or self._etag(path)
        if start_etag != self._etag(path):
            return  # changed since the caller's last read: answer at once
        try:
            async with asyncio.timeout(timeout_s):
                async with self._changed:
                    await self._changed.wait_for(lambda: self._etag(path) != start_etag or self._stopping.is_set())
        except TimeoutError:
            pass  # timeout_sec elapsed: the unchanged value

    def _answer(self, path: str) -> web.Response:
        if self.restricted and path == "instance/preempted":
            return web.Response(status=404, text="Not Found")
        if path == "instance/upcoming-maintenance" and path not in self.values:
            return web.Response(status=503, text=NO_NOTICE, headers={"ETag": self._etag(path)})
        if path not in self.values:
            return web.Response(status=404, text="Not Found")
        headers = {"ETag": self._etag(path), "Metadata-Flavor": "Google"}
        return web.Response(text=self.values[path], headers=headers, content_type="application/text")

    async def _fault(self, request: web.Request, fault: str) -> web.StreamResponse:
        if fault == "503":
            return web.Response(status=503, text="Service Unavailable")
        if fault == "garbage":
            return web.Response(body=b"\x00\xffnot-a-value\x00", headers={"ETag": "garbage"})
        if fault == "hang":
            await self._stopping.wait()
            return web.Response(status=503)
        if fault == "reset":
            assert request.transport is not None
            request.transport.abort()  # the client sees a reset; what follows goes nowhere
            return web.Response(status=500)
        raise ValueError(f"unknown fault {fault!r}")
