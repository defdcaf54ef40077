"""Who may call the admin endpoints: loopback, or a bearer token from a file.

The token file is read off the event loop, at most `MAX_TOKEN_BYTES`, only when it
is a regular file, and cached by (inode, size, mtime): rotating it needs no restart,
and a file that hangs (a FIFO, a dead NFS mount) or is huge cannot stall the service.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import os
import stat
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)

MAX_TOKEN_BYTES = 4096
_READ_DEADLINE_S = 2.0


class TokenFileError(Exception):
    """The token file exists but cannot be used; the message says why."""


def read_token(path: Path, cached: tuple[tuple[int, int, int], str] | None) -> tuple[tuple[int, int, int], str]:
    """(file identity, token) for `path`; re-reads only when the identity changed.
    Blocking: call it in a thread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise TokenFileError(f"{path}: cannot open: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise TokenFileError(f"{path}: not a regular file ({stat.filemode(info.st_mode)})")
        if info.st_size > MAX_TOKEN_BYTES:
            raise TokenFileError(f"{path}: {info.st_size} bytes, over the {MAX_TOKEN_BYTES} a token can be")
        identity = (info.st_ino, info.st_size, info.st_mtime_ns)
        if cached is not None and cached[0] == identity:
            return cached
        raw = os.read(fd, MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        raise TokenFileError(f"{path}: cannot read: {exc.strerror}") from None
    finally:
        os.close(fd)
    try:
        return identity, raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise TokenFileError(f"{path}: not UTF-8 text") from None


class AdminAuth:
    """Loopback callers are trusted (the CLI, a preStop hook in the same pod or VM).
    Off the node, a token must be configured and presented."""

    def __init__(self, token_file: Path | None) -> None:
        self._token_file = token_file
        self._cached: tuple[tuple[int, int, int], str] | None = None
        self._last_error: str | None = None

    def reload(self) -> None:
        """SIGHUP: forget the cached token; the next admin call reads the file again."""
        self._cached = None

    async def _token(self) -> tuple[str | None, str | None]:
        """(token, why there is none)."""
        if self._token_file is None:
            return None, "no admin token is configured on this node"
        try:
            async with asyncio.timeout(_READ_DEADLINE_S):
                self._cached = await asyncio.to_thread(read_token, self._token_file, self._cached)
        except (TokenFileError, TimeoutError) as exc:
            error = str(exc) or f"{self._token_file}: reading it took over {_READ_DEADLINE_S:g}s"
            if error != self._last_error:  # once per distinct problem, not once per request
                log.error("cannot use the admin token file", extra={"error": error})
                self._last_error = error
            return None, f"the admin token file cannot be used: {error}"
        self._last_error = None
        token = self._cached[1]
        return (token, None) if token else (None, f"the admin token file {self._token_file} is empty")

    async def check(self, request: web.Request) -> None:
        """Raise 401/403 (with a reason) unless the caller may act."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, presented = header.partition(" ")
            if scheme.lower() != "bearer" or not presented:
                raise _error(web.HTTPUnauthorized, "Authorization must be 'Bearer <token>'")
            token, why_not = await self._token()
            if token is None:
                raise _error(web.HTTPForbidden, why_not or "no admin token")
            if not hmac.compare_digest(presented.strip().encode(), token.encode()):
                raise _error(web.HTTPForbidden, "wrong admin token")
            return
        if _is_loopback(request.remote):
            return
        if self._token_file is None:
            raise _error(web.HTTPForbidden, "admin calls are only accepted from loopback")
        raise _error(web.HTTPUnauthorized, "admin calls from off the node need 'Authorization: Bearer <token>'")


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        address = ipaddress.ip_address(remote.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def _error(cls: type[web.HTTPException], reason: str) -> web.HTTPException:
    headers = {"WWW-Authenticate": "Bearer"} if cls is web.HTTPUnauthorized else None
    return cls(text=json.dumps({"error": reason}), content_type="application/json", headers=headers)
