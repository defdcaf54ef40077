"""JSON logs on stdout in the shape Cloud Logging understands (severity, message, time),
plus the lifecycle state and reason on every line.

Records never are written from the event loop: a bounded queue hands them to one
writer thread (the standard library's QueueHandler/QueueListener), so a stdout pipe
that nobody reads blocks that thread only; records that do not fit in the queue are
dropped and counted (`LOG_STATS`, gpu_node_agent_log_records_dropped_total).
"""

from __future__ import annotations

import copy
import json
import logging
import logging.handlers
import os
import queue
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

# LogRecord attributes that are not user-supplied `extra` fields.
_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime", "taskName"}

_SEVERITY = {
    logging.DEBUG: "DEBUG",
    logging.INFO: "INFO",
    logging.WARNING: "WARNING",
    logging.ERROR: "ERROR",
    logging.CRITICAL: "CRITICAL",
}


class JsonFormatter(logging.Formatter):
    """One JSON object per line. `context()` adds the lifecycle state and reason."""

    def __init__(self, context: Callable[[], dict[str, Any]] | None = None) -> None:
        super().__init__()
        self._context = context

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": _SEVERITY.get(record.levelno, "DEFAULT"),
            "message": record.getMessage(),
            "time": _rfc3339(record.created),
            "logger": record.name,
        }
        context = getattr(record, "_context", None)  # taken when the record was made (queued)
        if context is None and self._context is not None:
            context = self._context()
        for key, value in (context or {}).items():
            entry.setdefault(key, value)
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            entry["exception"] = record.exc_text
        return json.dumps(entry, default=str, separators=(",", ":"))


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: time, severity, message, then key=value extras."""

    def format(self, record: logging.LogRecord) -> str:
        extras = " ".join(
            f"{k}={v}" for k, v in vars(record).items() if k not in _RESERVED and not k.startswith("_")
        )
        line = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname:<7} {record.getMessage()}"
        if extras:
            line += "  " + extras
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        elif record.exc_text:
            line += "\n" + record.exc_text
        return line


class _LifecycleContext:
    """Mutable holder so the formatter can name the state once the lifecycle exists."""

    provider: Callable[[], dict[str, Any]] | None = None

    def __call__(self) -> dict[str, Any]:
        return {} if self.provider is None else self.provider()


lifecycle_context = _LifecycleContext()


@dataclass(slots=True)
class LogStats:
    dropped: int = 0  # the queue was full (the writer is stuck or slow)
    write_errors: int = 0  # the write itself failed (stdout closed, EPIPE, disk full)


LOG_STATS = LogStats()
_QUEUE_RECORDS = 2_000  # a few MB at most, held only while the writer lags; past it, drops (counted)
_listener: logging.handlers.QueueListener | None = None


class _QueueHandler(logging.handlers.QueueHandler):
    """Puts records on the bounded queue without ever blocking; a full queue drops."""

    def __init__(self, records: queue.Queue[Any]) -> None:
        super().__init__(records)
        self._plain = logging.Formatter()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        # Resolved now, on the caller's thread: the message, the traceback text and
        # the lifecycle state at the moment of the event, not when the writer gets to it.
        record = copy.copy(record)
        record.message = record.msg = record.getMessage()
        record.args = None
        if record.exc_info:
            record.exc_text = self._plain.formatException(record.exc_info)
            record.exc_info = None
        record._context = lifecycle_context()
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            LOG_STATS.dropped += 1


class _Writer:
    """The writer thread's one handler. Not a logging.Handler on purpose: logging's
    shutdown takes every Handler's lock, which a write stuck on a full pipe holds."""

    level = logging.NOTSET

    def __init__(self, stream: Any, formatter: logging.Formatter) -> None:
        self._stream = stream
        self._formatter = formatter

    def handle(self, record: logging.LogRecord) -> None:
        try:
            self._stream.write(self._formatter.format(record) + "\n")
            self._stream.flush()
        except Exception:
            LOG_STATS.write_errors += 1


def configure_logging(level: str = "INFO", fmt: str = "json", stream: Any = None) -> None:
    """Log through the queue to `stream` (stdout); call `stop_logging()` at exit."""
    global _listener
    stop_logging()
    records: queue.Queue[Any] = queue.Queue(_QUEUE_RECORDS)
    formatter = JsonFormatter(lifecycle_context) if fmt == "json" else TextFormatter()
    # _Writer is duck-typed as the listener's handler (it has `level` and `handle`).
    _listener = logging.handlers.QueueListener(records, cast(logging.Handler, _Writer(stream or sys.stdout, formatter)))
    _listener.start()
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(_QueueHandler(records))
    root.setLevel(level)
    # aiohttp's access log would print every /readyz probe; keep it for debugging only.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # transitions logs every callback at INFO; our Lifecycle logs the transition itself.
    logging.getLogger("transitions").setLevel(logging.WARNING)


def stop_logging(timeout_s: float = 2.0) -> bool:
    """Write what is queued, within `timeout_s`; False when the writer is stuck (its
    thread is a daemon thread: the process still exits)."""
    global _listener
    listener, _listener = _listener, None
    if listener is None or listener._thread is None:
        return True
    thread = listener._thread
    try:
        # The listener's stop mark (its private `_sentinel`, None), queued with a wait: a full
        # queue drains while the writer lives. enqueue_sentinel() would not wait.
        cast("queue.Queue[Any]", listener.queue).put(None, timeout=timeout_s)
    except queue.Full:
        return False
    thread.join(timeout_s)
    return not thread.is_alive()


def ensure_standard_fds() -> None:
    """Give fds 0-2 a home (/dev/null) when the process started with one closed, so no
    socket is ever opened as fd 1: stdout writes would go to it, and uvloop aborts the
    process at exit when fd 1 is reused."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
    if sys.stdout is None:  # the interpreter saw fd 1 closed at its start
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - lives as long as the process
    if sys.stderr is None:
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115


def _rfc3339(created: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{int((created % 1) * 1e6):06d}Z"
