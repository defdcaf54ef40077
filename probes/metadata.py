"""The GCE metadata server: a client for plain and hanging GETs, watchers that deliver
each new value of one path, presence detection (GCE, GKE Workload Identity, none)
and the node identity used for resource labels.

A value that cannot be read is unknown: the watcher records the failure in the
snapshot and backs off; it never delivers a guessed value (neither "safe" nor
"preempted").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

import aiohttp

from agent.core.backoff import backoff_s
from agent.core.snapshot import Key, Snapshot
from probes.base import FailureCode, ProbeError, http_code

log = logging.getLogger(__name__)

T = TypeVar("T")

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


class MetadataPresence(StrEnum):
    PRESENT = "present"
    ABSENT = "absent"  # nothing answers: not on GCE
    RESTRICTED = "restricted"  # answers but hides instance/preempted: GKE Workload Identity


async def detect_metadata(client: MetadataClient) -> MetadataPresence:
    """Raises ProbeError when a server answers but badly (503, garbage, hang): unknown."""
    try:
        await client.get("project/project-id")
    except ProbeError as exc:
        if exc.code == FailureCode.ABSENT:
            return MetadataPresence.ABSENT
        raise
    try:
        parse_preempted((await client.get(PREEMPTED)).text)
    except ProbeError as exc:
        if exc.code == FailureCode.NOT_FOUND:
            return MetadataPresence.RESTRICTED
        raise
    return MetadataPresence.PRESENT


async def serves(client: MetadataClient, path: str, params: Mapping[str, str] | None = None) -> bool:
    """False only when the server says the path does not exist (404); any other
    answer, good or bad, leaves it to the watcher, which reports trouble."""
    try:
        await client.get(path, params)
    except ProbeError as exc:
        return exc.code != FailureCode.NOT_FOUND
    return True


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    """What snapshot key "metadata.identity" holds; each field None when unavailable.
    `unreadable` names fields that failed for another reason than not existing."""

    presence: MetadataPresence
    project_id: str | None = None
    instance_id: str | None = None  # numeric, as gce_instance wants it
    zone: str | None = None  # short: us-central1-a
    instance_name: str | None = None
    hostname: str | None = None
    cluster_name: str | None = None
    cluster_location: str | None = None
    unreadable: tuple[str, ...] = ()


# The metadata source's snapshot keys, one writer each.
PREEMPTED_KEY: Key[bool] = Key("metadata.preempted")
MAINTENANCE_EVENT_KEY: Key[str] = Key("metadata.maintenance_event")
UPCOMING_MAINTENANCE_KEY: Key[dict[str, Any] | None] = Key("metadata.upcoming_maintenance")
IDENTITY_KEY: Key[NodeIdentity] = Key("metadata.identity")
WATCH_KEY: Key[dict[str, Any]] = Key("metadata.watch")  # what is watched and why (a failure when blind)

_IDENTITY_PATHS = {
    "project_id": "project/project-id",
    "instance_id": "instance/id",
    "zone": "instance/zone",
    "instance_name": "instance/name",
    "hostname": "instance/hostname",
    "cluster_name": "instance/attributes/cluster-name",
    "cluster_location": "instance/attributes/cluster-location",
}


async def fetch_identity(
    client: MetadataClient,
    presence: MetadataPresence = MetadataPresence.PRESENT,
    *,
    attempts: int = 3,
    retry_base_s: float = 0.5,
) -> NodeIdentity:
    """Reads every identity field at once; transient failures are retried a few times
    because a series' resource never changes once written."""
    if presence is MetadataPresence.ABSENT:
        return NodeIdentity(presence)
    fields = list(_IDENTITY_PATHS)
    answers = await asyncio.gather(*(_optional(client, _IDENTITY_PATHS[f], attempts, retry_base_s) for f in fields))
    values: dict[str, str | None] = {}
    unreadable: list[str] = []
    for field, (value, failed) in zip(fields, answers, strict=True):
        values[field] = value or None
        if failed:
            unreadable.append(field)
    if values["instance_id"] is not None and not values["instance_id"].isdigit():
        values["instance_id"] = None
        unreadable.append("instance_id")
    if values["zone"] is not None:
        values["zone"] = values["zone"].rsplit("/", 1)[-1]  # projects/N/zones/Z -> Z
    return NodeIdentity(presence, **values, unreadable=tuple(unreadable))


async def _optional(client: MetadataClient, path: str, attempts: int, retry_base_s: float) -> tuple[str | None, bool]:
    """(value, failed): a 404 is simply no value; other errors are retried, then reported."""
    for attempt in range(1, attempts + 1):
        try:
            return (await client.get(path)).text, False
        except ProbeError as exc:
            if exc.code == FailureCode.NOT_FOUND:
                return None, False
            if attempt == attempts:
                log.warning("identity field unreadable", extra={"path": path, "error": str(exc)})
                return None, True
            await asyncio.sleep(backoff_s(attempt, retry_base_s, 4 * retry_base_s))
    return None, True


class MetadataWatcher(Generic[T]):
    """Delivers every new value of one path: a plain GET, then hanging GETs with
    last_etag, so a change between two calls is not missed. Every answer refreshes
    snapshot key `key` (this watcher is its one writer); a failure marks it failed,
    stale, and is backed off with jitter. Nothing is ever guessed."""

    def __init__(
        self,
        client: MetadataClient,
        path: str,
        parse: Callable[[str], T],
        on_value: Callable[[T | None, str | None], None],
        snapshot: Snapshot,
        key: Key[T | None],
        timeout_sec: int = 60,
        *,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        none_codes: frozenset[str] = frozenset(),  # answers meaning "no value" (upcoming-maintenance)
        none_poll_s: float = 60.0,
        errors: Any = None,  # a Counter[str] counted per key, for probe_errors_total
        rng: random.Random | None = None,
        params: Mapping[str, str] | None = None,  # extra query, e.g. alt=json
    ) -> None:
        self._client = client
        self.path = path
        self._params = dict(params or {})
        self.key = key
        self._parse = parse
        self._on_value = on_value
        self._snapshot = snapshot
        self._timeout_sec = timeout_sec
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._none_codes = none_codes
        self._none_poll_s = none_poll_s
        self._errors = errors
        self._rng = rng
        self._stale_after_s = max(timeout_sec + client.wait_slack_s, none_poll_s + client.timeout_s) + 1.0
        self._delivered: tuple[T | None] | None = None  # boxed: None is a real value here
        self.failures = 0
        self.attempted = asyncio.Event()  # set after the first read, good or bad

    async def run(self) -> None:
        etag: str | None = None
        while True:
            try:
                value, etag = await self._read(etag)
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(backoff_s(self.failures, *self._backoff, rng=self._rng))
                continue
            self._succeeded(value, etag)
            if etag is None:
                await asyncio.sleep(self._none_poll_s)  # "no value" has no ETag to hang on: poll gently

    async def _read(self, etag: str | None) -> tuple[T | None, str | None]:
        try:
            if etag is None:
                answer = await self._client.get(self.path, self._params)
            else:
                answer = await self._client.wait_for_change(self.path, etag, self._timeout_sec, self._params)
        except ProbeError as exc:
            if exc.code in self._none_codes:
                return None, None
            raise
        if answer.etag is None:
            raise ProbeError(f"{self.path}: answer without an ETag: changes cannot be watched", code=FailureCode.GARBAGE)
        return self._parse(answer.text), answer.etag

    def _succeeded(self, value: T | None, etag: str | None) -> None:
        if self.failures:
            log.info("metadata watch recovered", extra={"path": self.path, "failures": self.failures})
        self.failures = 0
        self._snapshot.put(self.key, value, self._stale_after_s)
        self.attempted.set()
        if self._delivered is not None and self._delivered[0] == value:
            return
        try:
            self._on_value(value, etag)
        except Exception:  # not marked delivered: the next answer offers it again
            log.exception("metadata listener failed", extra={"path": self.path})
            return
        self._delivered = (value,)

    def _failed(self, exc: Exception) -> None:
        if not isinstance(exc, ProbeError):
            log.exception("metadata watch bug", extra={"path": self.path})
            exc = ProbeError(f"{type(exc).__name__}: {exc}", code=FailureCode.ERROR)
        self.failures += 1
        if self._errors is not None:
            self._errors[self.key] += 1
        self._snapshot.fail(self.key, str(exc), self._stale_after_s, code=exc.code)
        self.attempted.set()
        if self.failures in (1, 10) or self.failures % 100 == 0:
            extra = {"path": self.path, "error": str(exc), "failures": self.failures}
            log.warning("metadata watch failed", extra=extra)
