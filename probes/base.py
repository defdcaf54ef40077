"""The one Probe protocol and the shared runner that gives every probe its
interval, deadline, backoff, error counting and staleness; `ProbeError` and the
closed set of its failure codes (`FailureCode`)."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from enum import StrEnum
from typing import Any, Generic, Protocol, TypeVar

from agent.core.backoff import backoff_s
from agent.core.snapshot import Key, Snapshot

log = logging.getLogger(__name__)


T = TypeVar("T")
T_co = TypeVar("T_co", covariant=True)


class FailureCode(StrEnum):
    """Why a reading failed, as policies compare it. Closed, except two open families
    that are plain strings: `http_<status>` (`http_code()`) and an NVML error's name."""

    ERROR = "error"  # anything else (a bug, an unexpected exception)
    TIMEOUT = "timeout"
    REFUSED = "refused"  # not listening: vLLM loading or gone (a drain counts that as empty)
    CONNECTION = "connection"  # other connect or transport failures
    TOO_LARGE = "too_large"  # bytes, lines or one line over its cap
    GARBAGE = "garbage"  # not what the protocol says (not an exposition, not a metadata answer)
    INVALID = "invalid"  # well-formed, impossible numbers (negative, NaN, KV usage of 1.7)
    NOT_FOUND = "not_found"  # metadata: the path does not exist
    NO_NOTICE = "no_notice"  # metadata: upcoming-maintenance has nothing scheduled
    RESET = "reset"  # metadata: the connection was lost mid-answer
    ABSENT = "absent"  # metadata: nothing answers at the first contact
    UNREACHABLE = "unreachable"  # metadata: gone after having answered
    BLIND = "blind"  # metadata: instance/preempted is hidden (GKE Workload Identity)
    WEDGED = "wedged"  # NVML: too many calls stuck
    CLOSED = "closed"  # NVML: the worker is closed


def http_code(status: int) -> str:
    """The code of an HTTP answer other than 200 (an open family: http_503, ...)."""
    return f"http_{status}"


class ProbeError(Exception):
    """A probe could not produce a reading; the message says why (shown in /status).

    `code` is a short machine-readable kind (a `FailureCode`, `http_<n>` or an NVML
    error name) that policies can act on without parsing the message.
    """

    def __init__(self, message: str, code: str = FailureCode.ERROR) -> None:
        super().__init__(message)
        self.code = code


class Probe(Protocol[T_co]):
    """A source of one snapshot key, polled on an interval.

    `sample()` returns the new reading (stored whole under the key `name`) or raises;
    it must not block the loop (blocking work goes to a thread with a deadline).
    """

    @property
    def name(self) -> Key[Any]: ...
    @property
    def interval_s(self) -> float: ...
    @property
    def timeout_s(self) -> float: ...

    async def sample(self) -> T_co: ...


def worth_logging(in_a_row: int) -> bool:
    """The log rule for failures in a row, every source's: the 1st, the 10th, every 100th."""
    return in_a_row in (1, 10) or in_a_row % 100 == 0


class FailureRun(Generic[T]):
    """The one failure rule of every source (polled probes and hanging-GET watchers): a
    failure is counted (probe_errors_total), recorded in the snapshot (the last good value
    kept and now stale, with the failure's code) and worth a log line at the 1st, 10th and
    every 100th in a row; a success puts the new value and ends the run. Staleness itself
    is the reading's (`stale_after_s`), computed from its timestamp, never tracked here."""

    def __init__(self, snapshot: Snapshot, errors: Counter[str] | None, key: Key[T], stale_after_s: float) -> None:
        self._snapshot = snapshot
        self._errors = errors
        self._key = key
        self.stale_after_s = stale_after_s
        self.count = 0  # failures in a row

    def failed(self, message: str, code: str) -> bool:
        """Count and record one failure; True when it is one to log."""
        self.count += 1
        if self._errors is not None:
            self._errors[self._key] += 1
        self._snapshot.fail(self._key, message, self.stale_after_s, code=code)
        return worth_logging(self.count)

    def succeeded(self, value: T) -> None:
        self.count = 0
        self._snapshot.put(self._key, value, self.stale_after_s)


class ProbeRunner(Generic[T]):
    """Polls one probe forever; a failing sample is logged, counted, backed off and
    marked stale, and never ends the loop (only cancellation does)."""

    def __init__(
        self,
        probe: Probe[T],
        snapshot: Snapshot,
        errors: Counter[str],
        *,
        stale_after_s: float | None = None,
        backoff_cap_s: float = 30.0,
        on_sample: Callable[[T | None, str | None], None] | None = None,
    ) -> None:
        self.probe = probe
        self._failures = FailureRun[T](
            snapshot, errors, probe.name, stale_after_s or max(3 * probe.interval_s, probe.timeout_s + probe.interval_s)
        )
        self._backoff_cap_s = max(backoff_cap_s, probe.interval_s)
        self._on_sample = on_sample
        self._wake = asyncio.Event()
        self._sampling = asyncio.Lock()  # one sample at a time: the window must see them in order

    @property
    def consecutive_failures(self) -> int:
        return self._failures.count

    def poll_now(self) -> None:
        """Cut the current wait short."""
        self._wake.set()

    async def refresh(self) -> bool:
        """A reading taken now, whatever the backoff says (the drain deciding whether the
        node is empty cannot wait 30 s for a probe backing off from a dead vLLM). Waits
        for a sample already under way, then takes its own."""
        async with self._sampling:
            return await self.run_once()

    async def run(self) -> None:
        while True:
            async with self._sampling:
                await self.run_once()
            delay = backoff_s(self.consecutive_failures, self.probe.interval_s, self._backoff_cap_s)
            self._wake.clear()
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def run_once(self) -> bool:
        name = self.probe.name
        try:
            async with asyncio.timeout(self.probe.timeout_s):
                value = await self.probe.sample()
        except Exception as exc:
            reason = _describe(exc, self.probe.timeout_s)
            if isinstance(exc, ProbeError):
                code = exc.code
            else:
                code = FailureCode.TIMEOUT if isinstance(exc, TimeoutError) else FailureCode.ERROR
            level = logging.WARNING if self._failures.failed(reason, code) else logging.DEBUG
            log.log(level, "probe failed", extra={"probe": name, "error": reason, "failures": self._failures.count})
            self._notify(None, reason)
            return False
        if self._failures.count:
            log.info("probe recovered", extra={"probe": name, "failures": self._failures.count})
        self._failures.succeeded(value)
        self._notify(value, None)
        return True

    def _notify(self, value: Any | None, error: str | None) -> None:
        if self._on_sample is None:
            return
        try:
            self._on_sample(value, error)
        except Exception:
            log.exception("probe listener failed", extra={"probe": self.probe.name})


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {timeout_s:g}s"
    text = str(exc) or type(exc).__name__
    return text if isinstance(exc, ProbeError) else f"{type(exc).__name__}: {text}"
