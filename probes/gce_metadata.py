"""The GCE metadata server: a client for its hanging GETs, watchers that deliver
each new value of a path, presence detection and the node identity.

A value that cannot be read is unknown: the watcher records the failure in the
snapshot and backs off; it never delivers a guessed value (neither "safe" nor
"preempted").
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Generic, TypeVar

import aiohttp

from probes.base import ProbeError, backoff_s
from probes.http import get_capped
from probes.snapshot import Snapshot

log = logging.getLogger(__name__)

T = TypeVar("T")
DEFAULT_HOST = "metadata.google.internal"
PREEMPTED = "instance/preempted"
MAINTENANCE = "instance/maintenance-event"
UPCOMING = "instance/upcoming-maintenance"
MAINTENANCE_VALUES = frozenset({"NONE", "MIGRATE_ON_HOST_MAINTENANCE", "TERMINATE_ON_HOST_MAINTENANCE"})
_MAX_BYTES = 64 * 1024
_SLACK_S = 10.0  # client timeout above timeout_sec, like Google's guest agent (60 s + 10 s)


def metadata_base_url(configured_host: str | None, environ: dict[str, str] | None = None) -> str:
    """Config first, then GCE_METADATA_HOST (what Google's clients honour), then the DNS name."""
    env = os.environ if environ is None else environ
    host = configured_host or env.get("GCE_METADATA_HOST") or DEFAULT_HOST
    return f"http://{host}/computeMetadata/v1/"


@dataclass(frozen=True, slots=True)
class MetadataValue:
    text: str
    etag: str | None


class MetadataClient:
    def __init__(self, base_url: str, session: aiohttp.ClientSession, *, timeout_s: float = 5.0) -> None:
        self.base_url = base_url
        self._session = session
        self._timeout_s = timeout_s

    async def get(self, path: str, *, wait: bool = False, last_etag: str | None = None, timeout_sec: int = 60) -> MetadataValue:
        """One GET; with `wait`, a hanging GET that returns on change or after timeout_sec."""
        url = self.base_url + path
        timeout_s = self._timeout_s
        if wait:
            url += f"?wait_for_change=true&timeout_sec={timeout_sec}" + (f"&last_etag={last_etag}" if last_etag else "")
            timeout_s = timeout_sec + _SLACK_S
        body, etag = await get_capped(
            self._session, url, what=path, timeout_s=timeout_s, max_bytes=_MAX_BYTES,
            headers={"Metadata-Flavor": "Google"}, with_etag=True,
        )
        try:
            return MetadataValue(body.decode("utf-8").strip(), etag)
        except UnicodeDecodeError:
            raise ProbeError(f"{path}: not text", code="garbage") from None


def parse_preempted(text: str) -> bool:
    if text not in ("TRUE", "FALSE"):
        raise ProbeError(f"{PREEMPTED}: unexpected value {text[:40]!r}", code="garbage")
    return text == "TRUE"


def parse_maintenance(text: str) -> str:
    if text not in MAINTENANCE_VALUES:
        raise ProbeError(f"{MAINTENANCE}: unexpected value {text[:40]!r}", code="garbage")
    return text


def parse_upcoming(text: str) -> dict[str, Any]:
    try:
        notice = json.loads(text)
    except ValueError:
        raise ProbeError(f"{UPCOMING}: not JSON", code="garbage") from None
    if not isinstance(notice, dict):
        raise ProbeError(f"{UPCOMING}: not a JSON object", code="garbage")
    return notice


class Presence(StrEnum):
    PRESENT = "present"
    ABSENT = "absent"  # nothing answers: not on GCE (or the server is down)
    RESTRICTED = "restricted"  # answers but hides instance/preempted: GKE Workload Identity


async def detect(client: MetadataClient) -> Presence:
    try:
        await client.get("project/project-id")
    except ProbeError as exc:
        if exc.code in ("refused", "connection", "timeout"):
            return Presence.ABSENT
        raise
    try:
        await client.get(PREEMPTED)
    except ProbeError as exc:
        if exc.code == "http_404":
            return Presence.RESTRICTED
        raise
    return Presence.PRESENT


@dataclass(frozen=True, slots=True)
class NodeIdentity:
    presence: Presence
    project_id: str | None = None
    instance_id: str | None = None
    zone: str | None = None
    instance_name: str | None = None
    cluster_name: str | None = None
    cluster_location: str | None = None


async def fetch_identity(client: MetadataClient, presence: Presence) -> NodeIdentity:
    """Each field None when the server does not have it (e.g. cluster outside GKE)."""
    if presence is Presence.ABSENT:
        return NodeIdentity(presence)
    paths = {
        "project_id": "project/project-id",
        "instance_id": "instance/id",
        "zone": "instance/zone",
        "instance_name": "instance/name",
        "cluster_name": "instance/attributes/cluster-name",
        "cluster_location": "instance/attributes/cluster-location",
    }
    values: dict[str, str | None] = {}
    for field, path in paths.items():
        try:
            values[field] = (await client.get(path)).text or None
        except ProbeError:
            values[field] = None
    if values["zone"]:
        values["zone"] = values["zone"].rsplit("/", 1)[-1]  # projects/N/zones/Z -> Z
    return NodeIdentity(presence, **values)


class MetadataWatcher(Generic[T]):
    """Delivers every new value of one path: a plain GET, then hanging GETs with
    last_etag so no change between two calls is missed. Failures are recorded in
    the snapshot under `key` and backed off with jitter; nothing is guessed."""

    def __init__(
        self,
        client: MetadataClient,
        path: str,
        parse: Callable[[str], T],
        on_value: Callable[[T], None],
        snapshot: Snapshot,
        key: str,
        *,
        timeout_sec: int = 60,
        backoff_base_s: float = 1.0,
        backoff_cap_s: float = 30.0,
        none_codes: frozenset[str] = frozenset(),
    ) -> None:
        self._client = client
        self.path = path
        self._parse = parse
        self._on_value = on_value
        self._snapshot = snapshot
        self._key = key
        self._timeout_sec = timeout_sec
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._none_codes = none_codes  # answers that mean "no value" (upcoming-maintenance's 503)
        self.failures = 0
        self._stale_after_s = timeout_sec + _SLACK_S + backoff_cap_s

    async def run(self) -> None:
        etag: str | None = None
        delivered: Any = object()
        while True:
            try:
                value, etag = await self._read(etag)
            except ProbeError as exc:
                self.failures += 1
                self._snapshot.fail(self._key, str(exc), self._stale_after_s, code=exc.code)
                if self.failures in (1, 10) or self.failures % 100 == 0:
                    log.warning("metadata watch failed", extra={"path": self.path, "error": str(exc), "failures": self.failures})
                await asyncio.sleep(backoff_s(self.failures, *self._backoff))
                continue
            self.failures = 0
            self._snapshot.put(self._key, value, self._stale_after_s)
            if value != delivered:
                delivered = value
                self._on_value(value)
            if etag is None:
                await asyncio.sleep(self._backoff[0])  # "no value" has no ETag to wait on: poll gently

    async def _read(self, etag: str | None) -> tuple[T | None, str | None]:
        try:
            answer = await self._client.get(self.path, wait=etag is not None, last_etag=etag, timeout_sec=self._timeout_sec)
        except ProbeError as exc:
            if exc.code in self._none_codes:
                return None, None
            raise
        if answer.etag is None:
            raise ProbeError(f"{self.path}: answer without an ETag", code="garbage")
        return self._parse(answer.text), answer.etag
