"""What each signal does to the daemon, and the handlers' lifetime.

- SIGTERM, SIGINT: the first starts the drain, the second skips the waiting; later
  ones change nothing (the process is already on its way out) and never kill it.
- SIGHUP: re-read what can be re-read without a restart (the admin token file);
  logs that the other settings need a restart. Never a reload of the whole config:
  a half-applied config on a serving node is worse than none.
- SIGUSR1: write the whole /status document to the log (an SRE without curl).
- SIGUSR2: write every asyncio task's and thread's stack to the log (a wedged agent).

None of them kills the process (their default action would: no drain, no log).
Before the event loop runs, stop signals are remembered and replayed once it does,
and the others are ignored; after the loop is done, all of them are ignored.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
OTHER_SIGNALS = (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
ALL_SIGNALS = STOP_SIGNALS + OTHER_SIGNALS


class EarlySignals:
    """Process-wide handlers for the time the loop does not run yet (or any more)."""

    def __init__(self) -> None:
        self.pending: list[str] = []

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._remember)
        for sig in OTHER_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def ignore(self) -> None:
        """After the loop: ignored at the OS level. (A Python-level handler would not
        do: the interpreter resets those to SIG_DFL while it finalizes, and a signal in
        that window kills the process.)"""
        for sig in ALL_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    def _remember(self, signum: int, _frame: Any) -> None:
        self.pending.append(signal.Signals(signum).name)


class LoopSignals:
    """The daemon's handlers on the running loop; `remove()` puts back what was there."""

    def __init__(self, handlers: dict[signal.Signals, Callable[[str], None]]) -> None:
        self._handlers = handlers
        self._previous: dict[signal.Signals, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for sig, handler in self._handlers.items():
            self._previous[sig] = signal.getsignal(sig)
            loop.add_signal_handler(sig, handler, sig.name)

    def remove(self) -> None:
        """Undo `install()`. asyncio's remove_signal_handler resets to SIG_DFL (death for
        all of these), so the previous handler is put back explicitly."""
        if self._loop is None:
            return
        # Blocked while swapping: one arriving between the reset and our handler would
        # otherwise find SIG_DFL and kill the process; held, it goes to the new handler.
        signal.pthread_sigmask(signal.SIG_BLOCK, self._previous)
        try:
            for sig, previous in self._previous.items():
                self._loop.remove_signal_handler(sig)
                signal.signal(sig, previous if previous is not None else signal.SIG_IGN)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self._previous)
        self._previous.clear()
        self._loop = None


def stack_dump() -> dict[str, list[str]]:
    """Where every task and thread is now: the innermost few frames of each."""
    tasks = [f"{task.get_name()}: {_await_chain(task.get_coro())}" for task in asyncio.all_tasks()]
    threads = [
        f"{ident}: {' < '.join(_frame(f) for f, _ in itertools.islice(traceback.walk_stack(frame), 4))}"
        for ident, frame in sys._current_frames().items()
    ]
    return {"tasks": sorted(tasks), "threads": threads}


def _await_chain(coro: Any, keep: int = 3) -> str:
    where = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            break
        where.append(_frame(frame))
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(where[-keep:]) or "done"


def _frame(frame: Any) -> str:
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
