"""Keeps the persisted drain (agent/state_file.py) in step with the lifecycle:
restore at start, write on every change, and retry a failed write until it lands.
Blocking file work runs in a thread with a deadline; a failing disk is reported
(/status, the admin answer, the log), never fatal and never silent.

An unusable state file (unreadable, corrupt, not a regular file, huge) is moved
aside and reported; the agent starts without it. It is never deleted: it may be
the only record of why an SRE cordoned the node. If it cannot even be moved aside,
it is left alone and nothing is written over it (persistence is then off, and says
so) rather than destroyed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from agent.core.backoff import backoff_s
from agent.policy.requests import DrainDesk, DrainRequest
from agent.state_file import DrainStore, StateFileError
from state_machine import Source
from state_machine.saved_drain import SavedDrain

log = logging.getLogger(__name__)

T = TypeVar("T")

_IO_DEADLINE_S = 5.0  # a hung disk (NFS, a dying device) must not hang the caller
_RETRY_BASE_S, _RETRY_CAP_S = 1.0, 30.0


class DrainPersistence:
    def __init__(self, drains: DrainDesk, store: DrainStore, *, restore_deadline_s: float) -> None:
        self._drains = drains
        self._lifecycle = drains.lifecycle
        self.store = store
        self._restore_deadline_s = restore_deadline_s
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.error: str | None = None  # the last write's failure, None once one succeeds
        self.pending = False  # the last write failed: the disk does not have what a restart needs
        self.quarantined: list[str] = []  # unusable state files moved aside at start
        self.blocked: str | None = None  # why nothing may be written (an unmovable bad file)
        self.unwritable: str | None = None  # the state dir refused a write at start
        self._lifecycle.subscribe(lambda _t: self._changed.set())

    @property
    def persisted(self) -> bool:
        """True when what the next start would restore matches the lifecycle now."""
        return not self.pending and self.blocked is None

    def warning(self) -> str | None:
        """What a caller of an admin endpoint must be told, or None."""
        if self.persisted:
            return None
        why = self.blocked or self.error or "the write has not finished yet"
        return f"not persisted: {why}; an agent restart would not restore it (retrying)"

    async def restore(self) -> SavedDrain | None:
        """Start the drain the last run left, if any (the node then never warms up)."""
        await self._check_writable()
        try:
            saved = await self._io(self.store.load)
        except (StateFileError, TimeoutError) as exc:
            await self._set_aside(str(exc) or "reading it timed out")
            return None
        if saved is None:
            return None
        log.warning("restoring a persisted drain", extra={"reason": saved.reason.value, "detail": saved.detail})
        self._drains.request(
            DrainRequest(
                saved.reason,
                source=Source.STATE_FILE,
                deadline_s=saved.deadline_s(self._restore_deadline_s, time.time()),
                detail=saved.detail or f"restored {saved.reason.value} drain",
            )
        )
        return saved

    async def run(self) -> None:
        """Write after every transition; while a write keeps failing, try again with
        backoff (a full disk or a read-only remount can clear up)."""
        failures = 0
        while True:
            if self.pending:
                delay = backoff_s(failures, _RETRY_BASE_S, _RETRY_CAP_S)
                try:
                    async with asyncio.timeout(delay):
                        await self._changed.wait()
                except TimeoutError:
                    pass
            else:
                await self._changed.wait()
            self._changed.clear()
            failures = 0 if await self.sync() else failures + 1

    async def sync(self) -> bool:
        """Write the drain the next start must restore (admin, or terminal this boot);
        a signal or idle drain leaves the record alone, so an admin drain survives a
        restart that a SIGTERM caused. True when the disk now agrees."""
        async with self._lock:
            if self.blocked is not None:
                self.pending = True
                return False
            # `pending` changes only with a write's outcome: a write under way is not a
            # warning (every admin call waits for its own write before it answers).
            drain = self._lifecycle.drain
            try:
                if drain is None:
                    await self._io(self.store.clear)
                elif self.store.persists(drain.reason):
                    deadline_wall = drain.started_at_wall + (drain.deadline_mono - drain.started_at_mono)
                    await self._io(self.store.save, drain.reason, drain.detail, drain.started_at_wall, deadline_wall)
                    self.unwritable = None
            except (OSError, TimeoutError) as exc:
                error = f"{self.store.path}: {getattr(exc, 'strerror', None) or exc or 'timed out'}"
                if error != self.error:
                    log.error("cannot persist the drain state; retrying", extra={"error": error})
                self.error = error
                self.pending = True
                return False
            if self.error is not None:
                log.info("drain state persisted again", extra={"path": str(self.store.path)})
            self.error = None
            self.pending = False
            return True

    async def _check_writable(self) -> None:
        try:
            await self._io(self.store.writable)
        except (OSError, TimeoutError) as exc:
            self.unwritable = f"{self.store.path.parent}: {getattr(exc, 'strerror', None) or exc or 'timed out'}"
            log.warning(
                "state dir not writable: admin drains will not survive an agent restart",
                extra={"error": self.unwritable, "setting": "service.state_dir"},
            )

    async def _set_aside(self, problem: str) -> None:
        try:
            moved: Path = await self._io(self.store.quarantine)
        except (OSError, TimeoutError) as exc:
            self.blocked = f"{self.store.path} is unusable ({problem}) and cannot be moved aside ({exc}); it is kept as is"
            log.error("state file unusable; starting without it and writing nothing over it", extra={"error": self.blocked})
            return
        self.quarantined.append(str(moved))
        log.error(
            "state file unusable; moved aside, starting without it",
            extra={"error": problem, "moved_to": str(moved), "path": str(self.store.path)},
        )

    async def _io(self, fn: Callable[..., T], *args: Any) -> T:
        async with asyncio.timeout(_IO_DEADLINE_S):
            return await asyncio.to_thread(fn, *args)

    def describe(self) -> dict[str, object]:
        return {
            "path": str(self.store.path),
            "persisted": self.persisted,
            "error": self.blocked or self.error,
            "writable": self.unwritable is None,
            "unwritable_reason": self.unwritable,
            "quarantined": list(self.quarantined),
        }
