"""The GCE metadata server's client: plain and hanging GETs, every failure a ProbeError
with a code, and what its answers mean (the paths watched and their parsers)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp

from probes.base import FailureCode, ProbeError, http_code

DEFAULT_HOST = "metadata.google.internal"
PREEMPTED = "instance/preempted"
MAINTENANCE_EVENT = "instance/maintenance-event"
UPCOMING_MAINTENANCE = "instance/upcoming-maintenance"
MAINTENANCE_VALUES = frozenset({"NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE"})
# Answers that mean "no notice" on instance/upcoming-maintenance: a 503 saying so, or a
# 404 where the server does not offer the path at all.
NO_NOTICE_CODES = frozenset({FailureCode.NO_NOTICE, FailureCode.NOT_FOUND})

_FLAVOR = {"Metadata-Flavor": "Google"}
_MAX_BYTES = 64 * 1024
_CHUNK_BYTES = 16 * 1024


def metadata_base_url(preemption_cfg_metadata_host: str | None, environ: Mapping[str, str] | None = None) -> str:
    """Config first, then GCE_METADATA_HOST (what Google's own clients honour), then the DNS name."""
    env = os.environ if environ is None else environ
    host = preemption_cfg_metadata_host or env.get("GCE_METADATA_HOST") or DEFAULT_HOST
    return f"http://{host}/computeMetadata/v1/"


def error_code(status: int, body: str) -> str:
    """The ProbeError code for a non-200 answer."""
    if status == 404:
        return FailureCode.NOT_FOUND
    if status == 503 and "no notification" in body.lower():
        return FailureCode.NO_NOTICE  # upcoming-maintenance's way of saying "nothing scheduled"
    return http_code(status)


@dataclass(frozen=True, slots=True)
class MetadataValue:
    text: str
    etag: str | None


class MetadataClient:
    """GETs against one metadata server; every failure is a ProbeError with a code:
    http_<n>, not_found, no_notice, reset, timeout, garbage, absent (nothing there on
    the first contact) or unreachable (gone after having answered)."""

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        timeout_s: float = 3.0,  # the server answers plain GETs in milliseconds
        # A hanging GET that has not answered by timeout_sec + this is abandoned: the
        # server returns the unchanged value at timeout_sec, so a longer silence means a
        # dead connection, and a preemption notice cannot wait behind it.
        wait_slack_s: float = 2.0,
        max_bytes: int = _MAX_BYTES,
    ) -> None:
        self.base_url = base_url
        self.timeout_s = timeout_s
        self.wait_slack_s = wait_slack_s
        self._session = session
        self._max_bytes = max_bytes
        self.contacted = False  # any HTTP answer seen: later connect failures are outages, not absence

    async def get(self, path: str, params: Mapping[str, str] | None = None) -> MetadataValue:
        return await self._request(path, dict(params) if params else None, self.timeout_s)

    async def wait_for_change(
        self, path: str, last_etag: str, timeout_sec: int, params: Mapping[str, str] | None = None
    ) -> MetadataValue:
        """A hanging GET: returns when the value's ETag differs from `last_etag` (at once if
        it already does), or the unchanged value after `timeout_sec`."""
        query = {**(params or {}), "wait_for_change": "true", "last_etag": last_etag, "timeout_sec": str(timeout_sec)}
        return await self._request(path, query, timeout_sec + self.wait_slack_s)

    async def _request(self, path: str, params: dict[str, str] | None, timeout_s: float) -> MetadataValue:
        try:
            async with asyncio.timeout(timeout_s):
                # Redirects followed (a directory asked for without its slash answers 301),
                # a few at most; the server's answer check below still applies to the last.
                async with self._session.get(
                    self.base_url + path, params=params, headers=_FLAVOR, allow_redirects=True, max_redirects=3
                ) as resp:
                    self.contacted = True
                    body = await self._read(resp, path)
                    return _value(path, resp, body)
        except TimeoutError:
            raise ProbeError(f"{path}: no answer within {timeout_s:g}s", code=FailureCode.TIMEOUT) from None
        except aiohttp.ClientConnectorError as exc:
            code = FailureCode.UNREACHABLE if self.contacted else FailureCode.ABSENT
            raise ProbeError(f"{path}: cannot connect to {self.base_url}: {exc.os_error or exc}", code=code) from None
        except aiohttp.ClientResponseError as exc:  # not HTTP the client can parse
            raise ProbeError(f"{path}: bad HTTP answer: {exc.message}", code=FailureCode.GARBAGE) from None
        except aiohttp.ClientError as exc:  # disconnected, reset, truncated body
            raise ProbeError(f"{path}: connection lost: {type(exc).__name__}: {exc}", code=FailureCode.RESET) from None

    async def _read(self, resp: aiohttp.ClientResponse, path: str) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(_CHUNK_BYTES):
            size += len(chunk)
            if size > self._max_bytes:
                resp.close()  # nothing on this server is that big: drop the connection
                raise ProbeError(f"{path}: answer over {self._max_bytes} bytes", code=FailureCode.GARBAGE)
            chunks.append(chunk)
        return b"".join(chunks)


def _value(path: str, resp: aiohttp.ClientResponse, body: bytes) -> MetadataValue:
    text = body.decode("utf-8", errors="replace").strip()
    if resp.status != 200:
        raise ProbeError(f"{path} answered {resp.status}: {text[:80]!r}", code=error_code(resp.status, text))
    # The real server marks every answer; anything else at this address is not it.
    if resp.headers.get("Metadata-Flavor") != "Google":
        raise ProbeError(f"{path}: answer without Metadata-Flavor: Google (not a metadata server)", code=FailureCode.GARBAGE)
    try:
        return MetadataValue(body.decode("utf-8").strip(), resp.headers.get("ETag"))
    except UnicodeDecodeError:
        raise ProbeError(f"{path}: answer is not text", code=FailureCode.GARBAGE) from None


def parse_preempted(text: str) -> bool:
    if text not in ("TRUE", "FALSE"):
        raise ProbeError(f"{PREEMPTED}: unexpected value {text[:40]!r}", code=FailureCode.GARBAGE)
    return text == "TRUE"


def parse_maintenance_event(text: str) -> str:
    if text not in MAINTENANCE_VALUES:
        raise ProbeError(f"{MAINTENANCE_EVENT}: unexpected value {text[:40]!r}", code=FailureCode.GARBAGE)
    return text


# What "no notice" looks like on instance/upcoming-maintenance, depending on the host
# (besides a 404 and the 503 "no notifications have been received yet").
_NO_NOTICE_BODIES = frozenset({"", "NONE", '"NONE"', "{}", "null"})


def parse_upcoming_maintenance(text: str) -> dict[str, Any] | None:
    """The notice as a JSON object, or None for every form of "no notice"."""
    if text.strip() in _NO_NOTICE_BODIES:
        return None
    try:
        notice = json.loads(text)
    except (ValueError, RecursionError):
        raise ProbeError(f"{UPCOMING_MAINTENANCE}: not JSON: {text[:40]!r}", code=FailureCode.GARBAGE) from None
    if notice in ("NONE", {}, None):
        return None
    if not isinstance(notice, dict):
        raise ProbeError(f"{UPCOMING_MAINTENANCE}: not a JSON object", code=FailureCode.GARBAGE)
    return notice

