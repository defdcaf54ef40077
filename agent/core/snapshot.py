"""One in-memory snapshot of the node: frozen readings under typed keys, each with its age.

Probes write (one writer per key, readings replaced whole); the node view, the
HTTP service, /metrics, the exporter and the policies only read. A `Key[T]` is
declared once, next to the reading it holds (probes/vllm.py's `VLLM`, ...), so a
reader gets a `Reading[T]` back, not an Any.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

Clock = Callable[[], float]


class Key(str, Generic[T]):
    """The name of a snapshot entry and the type of what it holds: `Key[VllmReading]("vllm")`.

    A str, because the name is what /status and /metrics show and what older callers
    (and tests) pass; the type parameter is for the checker only.
    """

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class Reading(Generic[T]):
    """The last good value of one key and what happened since.

    `taken_at` is the monotonic time of the last good value (None: never had one);
    `failed_at`/`error` describe the latest failed attempt, if it came after it.
    """

    value: T | None
    taken_at: float | None
    stale_after_s: float
    error: str | None = None
    failed_at: float | None = None
    code: str | None = None  # machine-readable kind of the latest failure: refused, timeout, garbage, ...

    def age_s(self, now: float) -> float | None:
        return None if self.taken_at is None else max(0.0, now - self.taken_at)

    def is_stale(self, now: float) -> bool:
        """Stale when never read, too old, or the newest attempt failed."""
        if self.taken_at is None:
            return True
        if self.failed_at is not None and self.failed_at >= self.taken_at:
            return True
        return now - self.taken_at > self.stale_after_s

    def fresh_value(self, now: float) -> T | None:
        return None if self.is_stale(now) else self.value

    def describe(self, now: float) -> dict[str, Any]:
        """The JSON shape /status uses for every reading."""
        age = self.age_s(now)
        return {
            "age_s": None if age is None else round(age, 3),
            "stale": self.is_stale(now),
            "error": self.error if self.failed_at is not None else None,
            "error_code": self.code if self.failed_at is not None else None,
        }

    def failed_with(self, code: str) -> bool:
        """True when the newest attempt failed with `code` (after the last good value)."""
        if self.failed_at is None or self.code != code:
            return False
        return self.taken_at is None or self.failed_at >= self.taken_at


class Snapshot:
    """Keyed readings; each key has one writer. Reads never block and never await."""

    def __init__(self, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._readings: dict[str, Reading[Any]] = {}
        self._listeners: list[Callable[[Key[Any], Reading[Any]], None]] = []

    def now(self) -> float:
        return self._clock()

    def put(self, key: Key[T], value: T, stale_after_s: float) -> Reading[T]:
        reading = Reading(value=value, taken_at=self._clock(), stale_after_s=stale_after_s)
        return self._store(key, reading)

    def fail(self, key: Key[T], error: str, stale_after_s: float, code: str | None = None) -> Reading[T]:
        """Record a failed attempt; the last good value is kept and now reads as stale."""
        old = self._readings.get(key)
        reading = Reading(
            value=None if old is None else old.value,
            taken_at=None if old is None else old.taken_at,
            stale_after_s=stale_after_s,
            error=error,
            failed_at=self._clock(),
            code=code,
        )
        return self._store(key, reading)

    def get(self, key: Key[T]) -> Reading[T] | None:
        return self._readings.get(key)

    def value(self, key: Key[T], fresh: bool = True) -> T | None:
        reading = self._readings.get(key)
        if reading is None:
            return None
        return reading.fresh_value(self._clock()) if fresh else reading.value

    def items(self) -> list[tuple[str, Reading[Any]]]:
        return list(self._readings.items())

    def subscribe(self, listener: Callable[[Key[Any], Reading[Any]], None]) -> None:
        """`listener(key, reading)` runs on the loop thread after every write; it must not raise."""
        self._listeners.append(listener)

    def _store(self, key: Key[T], reading: Reading[T]) -> Reading[T]:
        self._readings[key] = reading
        for listener in self._listeners:
            listener(key, reading)
        return reading
