"""Who may call the admin endpoints: loopback, or a bearer token from a file."""

from __future__ import annotations

import hmac
import ipaddress
import json
import logging
from pathlib import Path

from aiohttp import web

log = logging.getLogger(__name__)


class AdminAuth:
    """Loopback callers are trusted (the CLI, a preStop hook in the same pod or VM).
    Off the node, a token must be configured and presented."""

    def __init__(self, token_file: Path | None) -> None:
        self._token_file = token_file

    def reload(self) -> None:
        """SIGHUP: read the token file again at the next call."""

    def _token(self) -> str | None:
        # Read on each call: rotating the token file needs no restart.
        if self._token_file is None:
            return None
        try:
            token = self._token_file.read_text().strip()
        except OSError as exc:
            log.error("cannot read admin token file", extra={"path": str(self._token_file), "error": str(exc)})
            return None
        return token or None

    def check(self, request: web.Request) -> None:
        """Raise 401/403 (with a reason) unless the caller may act."""
        header = request.headers.get("Authorization", "")
        if header:
            scheme, _, presented = header.partition(" ")
            token = self._token()
            if scheme.lower() != "bearer" or not presented:
                raise _error(web.HTTPUnauthorized, "Authorization must be 'Bearer <token>'")
            if token is None:
                raise _error(web.HTTPForbidden, "no admin token is configured on this node")
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
