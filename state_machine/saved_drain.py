"""The persisted drain as a record, pure: which drains survive an agent restart,
the record's fields, and the deadline a restored drain gets. The file that holds
it (written atomically, read defensively) is the daemon's: agent/state_file.py.

An admin drain survives an agent restart; a terminal drain (preemption, maintenance,
GPU fault) survives one within the same boot only, so a Spot VM that is stopped and
started again is not held back by its last life. The record carries the drain's
deadline (wall clock), so a terminal drain restored after an agent crash keeps what
was left of its notice instead of starting a fresh timeout.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from state_machine.states import DrainReason

PERSISTED_REASONS = frozenset({DrainReason.ADMIN, DrainReason.PREEMPTION, DrainReason.MAINTENANCE, DrainReason.GPU_FAULT})


def persists(reason: DrainReason) -> bool:
    """Whether a drain for `reason` is written down (a signal or idle drain is not)."""
    return reason in PERSISTED_REASONS


@dataclass(frozen=True, slots=True)
class SavedDrain:
    reason: DrainReason
    detail: str
    started_at_wall: float
    boot_id: str
    deadline_wall: float | None = None  # when the drain must end (wall clock); absent in old records

    @classmethod
    def from_record(cls, data: Any) -> SavedDrain:
        """From the decoded JSON; raises ValueError, KeyError or TypeError when it is not a record."""
        return cls(
            reason=DrainReason(data["reason"]),
            detail=str(data.get("detail", "")),
            started_at_wall=float(data["started_at_wall"]),
            boot_id=str(data.get("boot_id", "")),
            deadline_wall=None if data.get("deadline_wall") is None else float(data["deadline_wall"]),
        )

    def as_record(self) -> dict[str, Any]:
        return {
            "reason": self.reason.value,
            "detail": self.detail,
            "started_at_wall": self.started_at_wall,
            "boot_id": self.boot_id,
            "deadline_wall": self.deadline_wall,
        }

    def restorable(self, boot_id: str) -> bool:
        """An admin drain always; a terminal one only within the boot that wrote it."""
        return self.reason is DrainReason.ADMIN or self.boot_id == boot_id

    def deadline_s(self, default_s: float, now_wall: float) -> float:
        """The deadline a restored drain gets. A terminal drain keeps what is left of its
        saved deadline (a preemption notice does not restart because the agent did), never
        more than `default_s`; an admin drain, restored maybe days later, starts afresh."""
        if self.reason is DrainReason.ADMIN or self.deadline_wall is None:
            return default_s
        return max(0.0, min(default_s, self.deadline_wall - now_wall))
