"""The drain's state file, `<service.state_dir>/drain.json`: the fsync'd file I/O of the
persisted drain (the record itself is state_machine/saved_drain.py's SavedDrain).

Written atomically: temp file, fsync, rename, fsync of the directory; a failed write
leaves no temp file behind. Read defensively: only a regular file, at most
`MAX_RECORD_BYTES`, never blocking on a FIFO. A file that cannot be used is evidence
(another user's, a bad disk, a bug of ours): `quarantine()` moves it aside, never
deletes it. Blocking: agent/persistence.py calls it through a thread with a deadline.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import time
from pathlib import Path

from state_machine import DrainReason
from state_machine.saved_drain import SavedDrain, persists

log = logging.getLogger(__name__)

STATE_FILE = "drain.json"
MAX_RECORD_BYTES = 64 * 1024  # a record is ~300 bytes; anything near this is not ours


class StateFileError(Exception):
    """The state file exists but cannot be used; the message says why."""


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
        return persists(reason)

    def load(self) -> SavedDrain | None:
        """The drain to restore now, or None. Raises StateFileError when the file exists
        but cannot be used (unreadable, not a regular file, too big, not a record)."""
        raw = self._read()
        if raw is None:
            return None
        try:
            saved = SavedDrain.from_record(json.loads(raw))
        except (ValueError, KeyError, TypeError, RecursionError, OverflowError) as exc:
            raise StateFileError(f"{self.path}: not a drain record ({type(exc).__name__}: {str(exc)[:100]})") from None
        if not saved.restorable(self.boot_id):
            log.info("ignoring a terminal drain from an earlier boot", extra={"reason": saved.reason.value})
            return None
        return saved

    def _read(self) -> bytes | None:
        try:
            # O_NONBLOCK: a FIFO planted here must not hang the start; O_NOFOLLOW: nor a link.
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        except (FileNotFoundError, NotADirectoryError):  # no file, or no state dir at all
            return None
        except OSError as exc:
            raise StateFileError(f"{self.path}: cannot open: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise StateFileError(f"{self.path}: not a regular file (mode {stat.filemode(info.st_mode)})")
            if info.st_size > MAX_RECORD_BYTES:
                raise StateFileError(f"{self.path}: {info.st_size} bytes, over the {MAX_RECORD_BYTES} a drain record can be")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                return fh.read(MAX_RECORD_BYTES + 1)
        except OSError as exc:
            raise StateFileError(f"{self.path}: cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)

    def quarantine(self, now_wall: float | None = None) -> Path:
        """Move an unusable state file aside (same directory, so a rename) and return
        where it went; raises OSError when it cannot be moved."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now_wall is None else now_wall))
        target = self.path.with_name(f"{self.path.name}.unreadable-{stamp}")
        suffix = 0
        while target.exists() or target.is_symlink():
            suffix += 1
            target = self.path.with_name(f"{self.path.name}.unreadable-{stamp}-{suffix}")
        os.rename(self.path, target)
        self._fsync_dir()
        return target

    def writable(self) -> None:
        """Raises OSError when a record could not be written here now."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        probe = self.path.with_name(f".{self.path.name}.{os.getpid()}.probe")
        with open(probe, "w") as fh:
            fh.write("ok")
        probe.unlink()

    def save(self, reason: DrainReason, detail: str, started_at_wall: float, deadline_wall: float | None = None) -> None:
        record = SavedDrain(reason, detail, started_at_wall, self.boot_id, deadline_wall).as_record()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as fh:
                json.dump(record, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # a full disk must not also leave a 0-byte file
            raise
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
