"""Handlers both bounded-GET test modules serve (test_http.py, test_offloop_http.py):
a chunked body of ?bytes= (optionally ?pause_s= between 256 KiB pieces), and one
announced with a Content-Length."""

from __future__ import annotations

import asyncio

from aiohttp import web


async def streamed(request: web.Request) -> web.StreamResponse:
    # Chunked, no Content-Length: the cap can only be found by reading.
    total, pause_s = int(request.query["bytes"]), float(request.query.get("pause_s", "0"))
    resp = web.StreamResponse()
    await resp.prepare(request)
    sent = 0
    while sent < total:
        piece = min(256 * 1024, total - sent)
        await resp.write(b"x" * piece)
        sent += piece
        if pause_s:
            await asyncio.sleep(pause_s)
    await resp.write_eof()
    return resp


async def announced(request: web.Request) -> web.Response:
    return web.Response(body=b"y" * int(request.query["bytes"]))
