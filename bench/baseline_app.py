"""The yardstick for /readyz latency: a minimal aiohttp app on uvloop answering a constant 200."""

from __future__ import annotations

import asyncio
import sys

import uvloop
from aiohttp import web


async def main(port: int) -> None:
    app = web.Application()

    async def ok(_request: web.Request) -> web.Response:
        return web.json_response({"state": "READY", "ready": True})

    app.router.add_get("/readyz", ok)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    print(f"listening {site._server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 0))
