"""One bounded HTTP GET for probes: a deadline, a size cap, and every failure turned
into a ProbeError with a code policies can act on (refused, timeout, http_<n>,
too_large, connection)."""

from __future__ import annotations

import asyncio
import errno
import logging
from typing import Any

import aiohttp

from probes.base import FailureCode, ProbeError, http_code

log = logging.getLogger(__name__)

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
                    raise ProbeError(f"{what} answered {resp.status}", code=http_code(resp.status))
                body = await _read_capped(resp, what, max_bytes)
                return (body, resp.headers.get("ETag")) if with_etag else body
    except TimeoutError:
        raise ProbeError(f"{what} did not answer within {timeout_s:g}s", code=FailureCode.TIMEOUT) from None
    except aiohttp.ClientConnectorError as exc:
        if getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED:
            why = f"{what}: connection refused (not listening: loading or stopped)"
            raise ProbeError(why, code=FailureCode.REFUSED) from None
        raise ProbeError(f"{what}: {exc}", code=FailureCode.CONNECTION) from None
    except aiohttp.ClientError as exc:
        raise ProbeError(f"{what}: {type(exc).__name__}: {exc}", code=FailureCode.CONNECTION) from None


async def _read_capped(resp: aiohttp.ClientResponse, what: str, max_bytes: int) -> bytes:
    if resp.content_length is not None and resp.content_length > max_bytes:
        resp.close()
        raise ProbeError(f"{what} announces {resp.content_length} bytes, over {max_bytes}", code=FailureCode.TOO_LARGE)
    body = bytearray()  # one growing buffer, not a list of chunks to join: fewer, larger allocations
    try:
        async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
            if len(body) + len(chunk) > max_bytes:
                resp.close()  # drop the connection: the rest of the body is not worth reading
                raise ProbeError(f"{what} is over {max_bytes} bytes", code=FailureCode.TOO_LARGE)
            body += chunk
        return bytes(body)
    except BaseException:  # over the cap, or cut by the deadline (a cancellation)
        forget_body(body)
        raise


_TRIM_AFTER_BYTES = 1024 * 1024


def forget_body(body: bytearray) -> None:
    """Empty an abandoned body; a big one's freed memory goes back to the OS. Without
    this glibc keeps it: each such fault raised the daemon's RSS by 2-9 MB for good (soak)."""
    if len(body) >= _TRIM_AFTER_BYTES:
        body.clear()
        release_free_memory()
_malloc_trim: Any = None


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the OS (glibc `malloc_trim(0)`, which also
    releases free pages inside the heap). False where there is no glibc (musl, macOS)."""
    global _malloc_trim
    if _malloc_trim is None:
        try:
            import ctypes

            _malloc_trim = ctypes.CDLL(None).malloc_trim
            _malloc_trim.argtypes, _malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError) as exc:
            log.info("no malloc_trim here; freed buffers stay with the allocator", extra={"error": str(exc)})
            _malloc_trim = False
    if _malloc_trim is False:
        return False
    _malloc_trim(0)
    return True
