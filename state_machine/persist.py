"""The persisted drain: an admin drain survives an agent restart; a terminal drain
(preemption, maintenance, GPU fault) survives one within the same boot only, so a
Spot VM that is stopped and started again is not held back by its last life. The
record carries the drain's deadline (wall clock), so a terminal drain restored after
an agent crash keeps what was left of its notice instead of starting a fresh timeout.

Written atomically: temp file, fsync, rename, fsync of the directory.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from state_machine.states import DrainReason

log = logging.getLogger(__name__)

STATE_FILE = "drain.json"
_PERSISTED = {DrainReason.ADMIN, DrainReason.PREEMPTION, DrainReason.MAINTENANCE, DrainReason.GPU_FAULT}


class StateFileError(Exception):
    """The state file exists but cannot be used; the message says why."""


@dataclass(frozen=True, slots=True)
class SavedDrain:
    reason: DrainReason
    detail: str
    started_at_wall: float
    boot_id: str
    deadline_wall: float | None = None  # when the drain must end (wall clock); absent in old records

    def deadline_s(self, default_s: float, now_wall: float) -> float:
        """The deadline a restored drain gets. A terminal drain keeps what is left of its
        saved deadline (a preemption notice does not restart because the agent did), never
        more than `default_s`; an admin drain, restored maybe days later, starts afresh."""
        if self.reason is DrainReason.ADMIN or self.deadline_wall is None:
            return default_s
        return max(0.0, min(default_s, self.deadline_wall - now_wall))


def current_boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


class DrainStore:
    """Reads and writes `<state_dir>/drain.json`. Blocking: call through a thread."""

    def __init__(self, state_dir: Path, boot_id: str | None = None) -> None:
        self.path = Path(state_dir) / STATE_FILE
        self.boot_id = boot_id or current_boot_id()

    @staticmethod
    def persists(reason: DrainReason) -> bool:
        return reason in _PERSISTED

    def load(self) -> SavedDrain | None:
        """The drain to restore now, or None. Raises StateFileError on a corrupt file."""
        try:
            raw = self.path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"{self.path}: cannot read: {exc.strerror}") from None
        try:
            data = json.loads(raw)
            saved = SavedDrain(
                reason=DrainReason(data["reason"]),
                detail=str(data.get("detail", "")),
                started_at_wall=float(data["started_at_wall"]),
                boot_id=str(data.get("boot_id", "")),
                deadline_wall=None if data.get("deadline_wall") is None else float(data["deadline_wall"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StateFileError(f"{self.path}: not a drain record ({exc})") from None
        if saved.reason is not DrainReason.ADMIN and saved.boot_id != self.boot_id:
            log.info("ignoring a terminal drain from an earlier boot", extra={"reason": saved.reason.value})
            return None
        return saved

    def save(self, reason: DrainReason, detail: str, started_at_wall: float, deadline_wall: float | None = None) -> None:
        record = {
            "reason": reason.value,
            "detail": detail,
            "started_at_wall": started_at_wall,
            "boot_id": self.boot_id,
            "deadline_wall": deadline_wall,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w") as fh:
            json.dump(record, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        self._fsync_dir()

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            return
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
