"""One bounded HTTP GET for probes: a deadline, a size cap, and every failure turned
into a ProbeError with a code policies can act on (refused, timeout, http_<n>,
too_large, connection)."""

from __future__ import annotations

import asyncio
import errno
from typing import Any

import aiohttp

from probes.base import ProbeError

_CHUNK_BYTES = 64 * 1024


async def get_capped(
    session: aiohttp.ClientSession,
    url: str,
    *,
    what: str,
    timeout_s: float,
    max_bytes: int,
    headers: dict[str, str] | None = None,
    with_etag: bool = False,
) -> Any:
    """GET `url`; the body of a 200, at most `max_bytes` (with `with_etag`: body and
    the ETag header). `what` names it in messages."""
    try:
        async with asyncio.timeout(timeout_s):
            async with session.get(url, headers=headers, allow_redirects=False) as resp:
                if resp.status != 200:
                    raise ProbeError(f"{what} answered {resp.status}", code=f"http_{resp.status}")
                body = await _read_capped(resp, what, max_bytes)
                return (body, resp.headers.get("ETag")) if with_etag else body
    except TimeoutError:
        raise ProbeError(f"{what} did not answer within {timeout_s:g}s", code="timeout") from None
    except aiohttp.ClientConnectorError as exc:
        if getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED:
            raise ProbeError(f"{what}: connection refused (not listening: loading or stopped)", code="refused") from None
        raise ProbeError(f"{what}: {exc}", code="connection") from None
    except aiohttp.ClientError as exc:
        raise ProbeError(f"{what}: {type(exc).__name__}: {exc}", code="connection") from None


async def _read_capped(resp: aiohttp.ClientResponse, what: str, max_bytes: int) -> bytes:
    if resp.content_length is not None and resp.content_length > max_bytes:
        resp.close()
        raise ProbeError(f"{what} announces {resp.content_length} bytes, over {max_bytes}", code="too_large")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            resp.close()  # drop the connection: the rest of the body is not worth reading
            raise ProbeError(f"{what} is over {max_bytes} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)
