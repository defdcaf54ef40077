"""The metadata source, whole: `MetadataWatch` detects the server, publishes the node's
identity and what is watched (a blind watch is reported failing, never healthy),
then runs one watcher per path and hands each new value to its listener (the
preemption policy, agent/policy/preemption.py).

preemption.enabled: "false" contacts nothing (or reads the identity only, when export
needs it); "auto" watches only when a server answers; "true" watches and reports an
absent server as a failure.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agent.core.backoff import backoff_s
from agent.core.snapshot import Key, Snapshot
from probes.base import FailureCode, ProbeError
from probes.metadata.client import (
    MAINTENANCE_EVENT,
    NO_NOTICE_CODES,
    PREEMPTED,
    UPCOMING_MAINTENANCE,
    MetadataClient,
    parse_maintenance_event,
    parse_preempted,
    parse_upcoming_maintenance,
)
from probes.metadata.identity import MetadataPresence, NodeIdentity, detect_metadata, fetch_identity, serves
from probes.metadata.watcher import MetadataWatcher

log = logging.getLogger(__name__)

# The metadata source's snapshot keys, one writer each.
PREEMPTED_KEY: Key[bool] = Key("metadata.preempted")
MAINTENANCE_EVENT_KEY: Key[str] = Key("metadata.maintenance_event")
UPCOMING_MAINTENANCE_KEY: Key[dict[str, Any] | None] = Key("metadata.upcoming_maintenance")
IDENTITY_KEY: Key[NodeIdentity] = Key("metadata.identity")
WATCH_KEY: Key[dict[str, Any]] = Key("metadata.watch")  # what is watched and why (a failure when blind)

_ABSENT_CONFIRMATIONS = 3
UPCOMING_QUERY = {"alt": "json"}  # how Google documents reading instance/upcoming-maintenance
BLIND_NOTE = "GKE Workload Identity hides instance/preempted; preemption arrives as SIGTERM + preStop drain"


def _query(path: str) -> dict[str, str] | None:
    return UPCOMING_QUERY if path == UPCOMING_MAINTENANCE else None



class WatchSettings(Protocol):
    """The preemption section, as far as the watch needs it (agent.config.PreemptionConfig)."""

    @property
    def enabled(self) -> Literal["auto", "true", "false"]: ...
    @property
    def watch_timeout_s(self) -> int: ...
    @property
    def notice_budget_s(self) -> float: ...


class MetadataListener(Protocol):
    """Who hears each new value (agent/policy/preemption.py's PreemptionPolicy); synchronous, never raises."""

    def on_preempted(self, value: bool, etag: str | None) -> None: ...
    def on_maintenance_event(self, value: str, etag: str | None) -> None: ...
    def on_upcoming_maintenance(self, info: dict[str, Any] | None, etag: str | None) -> None: ...


@dataclass(frozen=True, slots=True)
class WatchTuning:
    """Timings; tests make them small."""

    timeout_sec: int | None = None  # hanging-GET timeout_sec; None: preemption.watch_timeout_s
    backoff_base_s: float = 1.0
    backoff_cap_s: float = 30.0  # maintenance paths: an hour's notice affords patience
    # instance/preempted: a 30 s notice affords none. A failing watch retries at least
    # every second, so a notice right after a run of bad answers is still seen in time.
    preempted_backoff_base_s: float = 0.25
    preempted_backoff_cap_s: float = 1.0
    redetect_s: float = 60.0  # auto mode: look again for a server that did not answer
    upcoming_poll_s: float = 60.0  # "no notice" has no ETag to hang on
    identity_retry_s: float = 0.5


class MetadataWatch:
    """Run `run()` under the supervisor. preemption.enabled: "false" contacts nothing;
    "auto" watches only when a server answers; "true" watches and reports an absent
    server as a failure. `settled` is set once the first preempted value (or its
    failure, or the verdict that there is nothing to watch) is in."""

    def __init__(
        self,
        client: MetadataClient,
        snapshot: Snapshot,
        policy: MetadataListener,
        cfg: WatchSettings,
        *,
        tuning: WatchTuning = WatchTuning(),
        errors: Counter[str] | None = None,  # counted per key, for probe_errors_total
        rng: random.Random | None = None,
        identity_wanted: bool = False,  # export labels its series with it: read it even when not watching
    ) -> None:
        self._identity_wanted = identity_wanted
        self._client = client
        self._snapshot = snapshot
        self._policy = policy
        self._cfg = cfg
        self._tuning = tuning
        self._errors = errors
        self._rng = rng
        self.presence: MetadataPresence | None = None
        self.watchers: dict[str, MetadataWatcher[Any]] = {}
        self.settled = asyncio.Event()
        self._published: dict[str, Any] | None = None

    async def run(self) -> None:
        """Watch for ever; with preemption.enabled=false it returns once there is nothing
        more to do (run it as a task that may finish)."""
        if self._cfg.enabled == "false":
            # Export still needs the node's identity (gce_instance / k8s_pod labels): read
            # it, watch nothing. Without it every series would land on generic_node.
            reads = "is read for the node identity only" if self._identity_wanted else "is not contacted"
            note = f"preemption.enabled=false: the metadata server {reads}"
            self._publish([], note)
            self.settled.set()
            if self._identity_wanted:
                self.presence = await self._detect()
                await self._identity(self.presence)
                self._publish([], note)  # again, with the presence found
            return
        self.presence = await self._detect()
        async with asyncio.TaskGroup() as group:
            if self.presence is MetadataPresence.PRESENT:
                # First and at once: asking which maintenance paths exist can take a
                # few seconds on a struggling server, a preemption notice cannot wait.
                self._watch(group, [PREEMPTED])
            group.create_task(self._identity(self.presence), name="metadata:identity")
            self._watch(group, [p for p in (UPCOMING_MAINTENANCE, MAINTENANCE_EVENT) if await serves(self._client, p, _query(p))])
            self._publish(list(self.watchers), BLIND_NOTE if self.presence is MetadataPresence.RESTRICTED else "")
            preempted = self.watchers.get(PREEMPTED)
            if preempted is not None:
                await preempted.attempted.wait()
            self.settled.set()

    def _watch(self, group: asyncio.TaskGroup, paths: list[str]) -> None:
        """Start one watcher per path (all registered before any starts: maintenance-event
        looks for the upcoming-maintenance watcher when it starts)."""
        watchers = {path: self._watcher(path) for path in paths}
        self.watchers.update(watchers)
        for path, watcher in watchers.items():
            group.create_task(self._start(watcher), name=f"metadata:{path}")

    async def _detect(self) -> MetadataPresence:
        """Until a server answers; in auto mode an absent one is looked for again every redetect_s."""
        failures = absent = 0
        while True:
            try:
                presence = await detect_metadata(self._client)
            except ProbeError as exc:  # it answers, but badly: unknown, never "absent"
                failures += 1
                error = f"cannot tell what serves at {self._client.base_url}: {exc}"
                self._snapshot.fail(WATCH_KEY, error, math.inf, code=exc.code)
                # instance/preempted is not watched until this succeeds: retry as briskly as its watch.
                await asyncio.sleep(self._preempted_backoff(failures))
                continue
            if presence is not MetadataPresence.ABSENT:
                return presence
            absent += 1
            self.presence = presence
            if absent == _ABSENT_CONFIRMATIONS:
                # Only now: a server down for a moment at boot must not make the exporter
                # settle on a resource without the instance's labels.
                self._snapshot.put(IDENTITY_KEY, NodeIdentity(presence), math.inf)
            self._publish([], f"no metadata server at {self._client.base_url}; looking again")
            self.settled.set()
            await asyncio.sleep(self._backoff(absent, self._tuning.redetect_s))

    def _publish(self, paths: list[str], note: str) -> None:
        """What is watched and why. Blind (no instance/preempted) is a failure, and so is
        an absent server when preemption.enabled=true; both keep the value for /status."""
        watch = {
            "enabled": self._cfg.enabled,
            "presence": None if self.presence is None else self.presence.value,
            "server": self._client.base_url,
            "watching": paths,
            "blind_to_preemption": PREEMPTED not in paths,
            "note": note,
        }
        self._snapshot.put(WATCH_KEY, watch, math.inf)
        if self.presence is MetadataPresence.RESTRICTED:
            self._snapshot.fail(WATCH_KEY, f"blind to preemption: {BLIND_NOTE}", math.inf, code=FailureCode.BLIND)
        elif self.presence is MetadataPresence.ABSENT and self._cfg.enabled == "true":
            self._snapshot.fail(WATCH_KEY, f"preemption.enabled=true but {note}", math.inf, code=FailureCode.ABSENT)
        if watch != self._published:
            log.info("metadata watch", extra={"watch": watch})
            self._published = watch

    def _watcher(self, path: str) -> MetadataWatcher[Any]:
        policy, tuning = self._policy, self._tuning
        table: dict[str, tuple[Callable[[str], Any], Callable[[Any, str | None], None], Key[Any], frozenset[str]]] = {
            PREEMPTED: (parse_preempted, policy.on_preempted, PREEMPTED_KEY, frozenset()),
            MAINTENANCE_EVENT: (parse_maintenance_event, policy.on_maintenance_event,
                                MAINTENANCE_EVENT_KEY, frozenset()),
            UPCOMING_MAINTENANCE: (parse_upcoming_maintenance, policy.on_upcoming_maintenance,
                                   UPCOMING_MAINTENANCE_KEY, NO_NOTICE_CODES),
        }  # fmt: skip
        parse, on_value, key, none_codes = table[path]
        base_s, cap_s = (
            (tuning.preempted_backoff_base_s, tuning.preempted_backoff_cap_s)
            if path == PREEMPTED
            else (tuning.backoff_base_s, tuning.backoff_cap_s)
        )
        return MetadataWatcher(
            self._client, path, parse, on_value, self._snapshot, key, self._timeout_sec(path),
            backoff_base_s=base_s, backoff_cap_s=cap_s,
            none_codes=none_codes, none_poll_s=tuning.upcoming_poll_s, errors=self._errors, rng=self._rng,
            params=_query(path),
        )  # fmt: skip

    async def _start(self, watcher: MetadataWatcher[Any]) -> None:
        upcoming = self.watchers.get(UPCOMING_MAINTENANCE)
        if watcher.path == MAINTENANCE_EVENT and upcoming is not None:
            # A TERMINATE seen first would drain on the budget instead of the window start.
            try:
                async with asyncio.timeout(self._client.timeout_s):
                    await upcoming.attempted.wait()
            except TimeoutError:
                log.info("upcoming-maintenance still unread; watching maintenance-event anyway")
        await watcher.run()

    async def _identity(self, presence: MetadataPresence) -> None:
        """Publish the identity; fields that failed (not merely absent) are read again later."""
        for attempt in range(1, 6):
            identity = await fetch_identity(self._client, presence, retry_base_s=self._tuning.identity_retry_s)
            self._snapshot.put(IDENTITY_KEY, identity, math.inf)
            if not identity.unreadable:
                return
            await asyncio.sleep(self._backoff(attempt, self._tuning.redetect_s))

    def _backoff(self, failures: int, cap_s: float) -> float:
        return backoff_s(failures, min(self._tuning.backoff_base_s, cap_s), cap_s, self._rng)

    def _preempted_backoff(self, failures: int) -> float:
        tuning = self._tuning
        return backoff_s(failures, tuning.preempted_backoff_base_s, tuning.preempted_backoff_cap_s, self._rng)

    def _timeout_sec(self, path: str) -> int:
        """The hanging GET's timeout_sec. For instance/preempted at most a third of the
        notice budget: a connection that silently stops answering is abandoned at
        timeout_sec + a small slack, and must cost at most a third of the notice."""
        timeout_sec = self._tuning.timeout_sec or self._cfg.watch_timeout_s
        if path == PREEMPTED:
            timeout_sec = min(timeout_sec, max(1, int(self._cfg.notice_budget_s // 3)))
        return timeout_sec

