"""The typed Lifecycle: the SPEC §4 transition table on a synchronous
`transitions.Machine`, with drains, bounded history and listeners.

Synchronous on purpose (see STYLE.md): every trigger is one atomic call on the
loop thread; callbacks only record, count and notify, and never raise.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from transitions import Machine

from state_machine.states import (
    DRAIN_PRIORITY,
    TERMINAL_REASONS,
    DrainReason,
    Source,
    State,
)

log = logging.getLogger(__name__)

# (trigger, sources, dest). DRAINING -> DRAINING records a drain taken over by a
# higher-priority reason ("escalate") and an admin drain that emptied the node ("drained").
_TABLE: list[dict[str, Any]] = [
    {"trigger": "warm", "source": [State.INIT], "dest": State.WARMING},
    {"trigger": "ready", "source": [State.WARMING], "dest": State.READY},
    {"trigger": "lost", "source": [State.READY], "dest": State.WARMING},
    {"trigger": "drain", "source": [State.INIT, State.WARMING, State.READY], "dest": State.DRAINING},
    {"trigger": "escalate", "source": [State.DRAINING], "dest": State.DRAINING},
    {"trigger": "drained", "source": [State.DRAINING], "dest": State.DRAINING},
    {"trigger": "resume", "source": [State.DRAINING], "dest": State.WARMING},
    {"trigger": "terminate", "source": [State.DRAINING], "dest": State.TERMINATED},
]


class ResumeRefused(Exception):
    """`resume` is only for an admin drain; the message says why not."""


@dataclass(frozen=True, slots=True)
class Drain:
    """The drain under way (or finished, in TERMINATED)."""

    reason: DrainReason
    source: Source
    detail: str
    started_at_mono: float
    started_at_wall: float
    deadline_mono: float
    event_id: str | None = None
    drained: bool = False

    @property
    def terminal(self) -> bool:
        return self.reason in TERMINAL_REASONS


@dataclass(frozen=True, slots=True)
class Transition:
    seq: int
    from_state: State
    to_state: State
    reason: str
    source: Source
    at_wall: float
    at_mono: float
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "from": self.from_state.value,
            "to": self.to_state.value,
            "reason": self.reason,
            "source": self.source.value,
            "at": _iso(self.at_wall),
            "detail": self.detail,
        }


class _Model:
    """What `transitions` decorates with trigger methods; nothing else touches it."""

    state: State


class Lifecycle:
    """INIT -> WARMING -> READY -> DRAINING -> TERMINATED, typed and idempotent.

    Every method returns False (or raises ResumeRefused) instead of making a
    transition the table does not allow, so callers never need to pre-check.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        history_len: int = 200,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._model = _Model()
        self._machine = Machine(
            model=self._model,
            states=State,
            transitions=_TABLE,
            initial=State.INIT,
            auto_transitions=False,
            send_event=True,
            after_state_change=self._record,
        )
        self._seq = itertools.count(1)
        self.history: deque[Transition] = deque(maxlen=history_len)
        self.transitions_total: Counter[tuple[str, str, str]] = Counter()
        self.drain: Drain | None = None
        self._listeners: list[Callable[[Transition], None]] = []
        self._since_mono = clock()
        self._since_wall = wall()
        self._reason = "starting"
        self._seen_events: set[str] = set()

    # --- read side -------------------------------------------------------
    @property
    def state(self) -> State:
        return self._model.state

    @property
    def reason(self) -> str:
        return self._reason

    @property
    def since_wall(self) -> float:
        return self._since_wall

    def seconds_in_state(self) -> float:
        return self._clock() - self._since_mono

    @property
    def is_ready(self) -> bool:
        return self._model.state is State.READY

    def subscribe(self, listener: Callable[[Transition], None]) -> None:
        """`listener(transition)` runs synchronously after every transition."""
        self._listeners.append(listener)

    # --- triggers --------------------------------------------------------
    def start_warming(self, detail: str = "probes started") -> bool:
        return self._fire("warm", "started", Source.AGENT, detail)

    def mark_ready(self, detail: str) -> bool:
        return self._fire("ready", "inference_healthy", Source.INFERENCE, detail)

    def mark_lost(self, detail: str) -> bool:
        return self._fire("lost", "inference_lost", Source.INFERENCE, detail)

    def begin_drain(
        self,
        reason: DrainReason,
        source: Source,
        *,
        deadline_s: float,
        detail: str = "",
        event_id: str | None = None,
    ) -> bool:
        """Start a drain, or take over the running one when `reason` outranks it.

        Returns False when nothing changed: a repeated event id, a drain of equal or
        lower priority, or a node already TERMINATED. A takeover never moves the
        deadline later.
        """
        if event_id is not None and event_id in self._seen_events:
            return False
        state = self._model.state
        now = self._clock()
        new = Drain(
            reason=reason,
            source=source,
            detail=detail,
            started_at_mono=now,
            started_at_wall=self._wall(),
            deadline_mono=now + max(0.0, deadline_s),
            event_id=event_id,
        )
        if state is State.TERMINATED:
            return False
        if state is State.DRAINING:
            assert self.drain is not None
            if DRAIN_PRIORITY[reason] <= DRAIN_PRIORITY[self.drain.reason]:
                return False
            new = replace(
                new,
                started_at_mono=self.drain.started_at_mono,
                started_at_wall=self.drain.started_at_wall,
                deadline_mono=min(new.deadline_mono, self.drain.deadline_mono),
            )
            trigger = "escalate"
        else:
            trigger = "drain"
        if event_id is not None:
            self._seen_events.add(event_id)
        self.drain = new
        return self._fire(trigger, reason.value, source, detail)

    def mark_drained(self) -> bool:
        """An admin drain emptied the node: it stays DRAINING, marked drained."""
        if self._model.state is not State.DRAINING or self.drain is None or self.drain.drained:
            return False
        self.drain = replace(self.drain, drained=True)
        return self._fire("drained", f"{self.drain.reason.value}_drained", Source.DRAIN, "nothing in flight")

    def resume(self, source: Source = Source.ADMIN_API) -> None:
        """End an admin drain (DRAINING -> WARMING). Raises ResumeRefused otherwise."""
        if self._model.state is not State.DRAINING or self.drain is None:
            raise ResumeRefused(f"not draining (state {self._model.state.value})")
        if self.drain.reason is not DrainReason.ADMIN:
            raise ResumeRefused(f"the drain is a {self.drain.reason.value} drain; only an admin drain can be resumed")
        self.drain = None
        self._fire("resume", "resumed", source, "admin drain ended")

    def terminate(self, detail: str) -> bool:
        """End a terminal drain. An admin drain never terminates by itself."""
        if self._model.state is not State.DRAINING or self.drain is None or not self.drain.terminal:
            return False
        return self._fire("terminate", f"{self.drain.reason.value}_drained", Source.DRAIN, detail)

    # --- internals -------------------------------------------------------
    def _fire(self, trigger: str, reason: str, source: Source, detail: str) -> bool:
        if trigger not in self._machine.get_triggers(self._model.state):
            return False
        self._pending = (reason, source, detail)
        getattr(self._model, trigger)()
        return True

    def _record(self, event: Any) -> None:
        reason, source, detail = self._pending
        from_state = State(event.transition.source)
        to_state = State(event.transition.dest)
        now, wall = self._clock(), self._wall()
        if from_state is not to_state:
            self._since_mono, self._since_wall = now, wall
        self._reason = reason
        record = Transition(next(self._seq), from_state, to_state, reason, source, wall, now, detail)
        self.history.append(record)
        self.transitions_total[(from_state.value, to_state.value, reason)] += 1
        log.info(
            "state %s -> %s",
            from_state.value,
            to_state.value,
            extra={"state": to_state.value, "reason": reason, "source": source.value, "detail": detail},
        )
        for listener in self._listeners:
            try:
                listener(record)
            except Exception:  # a listener bug must not leave the machine half-moved
                log.exception("lifecycle listener failed")


def _iso(wall: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(wall)) + f".{int((wall % 1) * 1000):03d}Z"
