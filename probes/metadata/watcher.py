"""MetadataWatcher: every new value of one metadata path, by hanging GET.

A value that cannot be read is unknown: the watcher records the failure in the
snapshot and backs off; it never delivers a guessed value (neither "safe" nor
"preempted").
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Generic, TypeVar

from agent.core.backoff import backoff_s
from agent.core.snapshot import Key, Snapshot
from probes.base import FailureCode, FailureRun, ProbeError
from probes.metadata.client import MetadataClient

log = logging.getLogger(__name__)

T = TypeVar("T")


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
        errors: Counter[str] | None = None,  # counted per key, for probe_errors_total
        rng: random.Random | None = None,
        params: Mapping[str, str] | None = None,  # extra query, e.g. alt=json
    ) -> None:
        self._client = client
        self.path = path
        self._params = dict(params or {})
        self.key = key
        self._parse = parse
        self._on_value = on_value
        self._timeout_sec = timeout_sec
        self._backoff = (backoff_base_s, backoff_cap_s)
        self._none_codes = none_codes
        self._none_poll_s = none_poll_s
        self._rng = rng
        stale_after_s = max(timeout_sec + client.wait_slack_s, none_poll_s + client.timeout_s) + 1.0
        self._failures = FailureRun[T | None](snapshot, errors, key, stale_after_s)
        self._delivered: tuple[T | None] | None = None  # boxed: None is a real value here
        self.attempted = asyncio.Event()  # set after the first read, good or bad

    @property
    def failures(self) -> int:
        """Failed reads in a row."""
        return self._failures.count

    async def run(self) -> None:
        etag: str | None = None
        while True:
            try:
                value, etag = await self._read(etag)
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(backoff_s(self._failures.count, *self._backoff, rng=self._rng))
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
        if self._failures.count:
            log.info("metadata watch recovered", extra={"path": self.path, "failures": self._failures.count})
        self._failures.succeeded(value)
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
        worth_a_line = self._failures.failed(str(exc), exc.code)
        self.attempted.set()
        if worth_a_line:
            extra = {"path": self.path, "error": str(exc), "failures": self._failures.count}
            log.warning("metadata watch failed", extra=extra)

