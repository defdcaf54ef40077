"""Keeps the persisted drain (state_machine/persist.py) in step with the lifecycle:
restore at start, write on every change. Blocking file work runs in a thread; a
failing disk is reported in /status, never fatal."""

from __future__ import annotations

import asyncio
import logging
import time

from state_machine import Lifecycle, Source
from state_machine.persist import DrainStore, SavedDrain, StateFileError

log = logging.getLogger(__name__)


class DrainPersistence:
    def __init__(self, lifecycle: Lifecycle, store: DrainStore, *, restore_deadline_s: float) -> None:
        self._lifecycle = lifecycle
        self.store = store
        self._restore_deadline_s = restore_deadline_s
        self._lock = asyncio.Lock()
        self.error: str | None = None

    async def restore(self) -> SavedDrain | None:
        """Start the drain the last run left, if any (the node then never warms up)."""
        try:
            saved = await asyncio.to_thread(self.store.load)
        except StateFileError as exc:
            # A corrupt record must not keep a healthy node out of service, nor be lost.
            log.error("state file unusable; starting without it", extra={"error": str(exc)})
            return None
        if saved is None:
            return None
        log.warning("restoring a persisted drain", extra={"reason": saved.reason.value, "detail": saved.detail})
        self._lifecycle.begin_drain(
            saved.reason,
            Source.STATE_FILE,
            deadline_s=saved.deadline_s(self._restore_deadline_s, time.time()),
            detail=saved.detail or f"restored {saved.reason.value} drain",
        )
        return saved

    async def run(self) -> None:
        """Write after every transition (admin calls also `sync()` before they answer)."""
        changed = asyncio.Event()
        self._lifecycle.subscribe(lambda _t: changed.set())
        while True:
            await changed.wait()
            changed.clear()
            await self.sync()

    async def sync(self) -> bool:
        """Write the drain the next start must restore (admin, or terminal this boot);
        a signal or idle drain leaves the record alone, so an admin drain survives a
        restart that a SIGTERM caused."""
        async with self._lock:
            drain = self._lifecycle.drain
            try:
                if drain is None:
                    await asyncio.to_thread(self.store.clear)
                elif self.store.persists(drain.reason):
                    deadline_wall = drain.started_at_wall + (drain.deadline_mono - drain.started_at_mono)
                    await asyncio.to_thread(self.store.save, drain.reason, drain.detail, drain.started_at_wall, deadline_wall)
            except OSError as exc:
                self.error = f"{self.store.path}: {exc.strerror or exc}"
                log.error("cannot persist the drain state", extra={"error": self.error})
                return False
            self.error = None
            return True
