"""agent/state_file.py: the drain record on disk (atomic writes, defensive reads, quarantine)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.state_file import DrainStore, StateFileError
from state_machine.states import DrainReason


def test_admin_drain_survives_a_restart_and_a_reboot(tmp_path: Path) -> None:
    DrainStore(tmp_path, boot_id="boot-1").save(DrainReason.ADMIN, "maintenance window", 1.5)
    saved = DrainStore(tmp_path, boot_id="boot-2").load()
    assert saved is not None and saved.reason is DrainReason.ADMIN and saved.detail == "maintenance window"


def test_preemption_is_honoured_in_the_same_boot_only(tmp_path: Path) -> None:
    DrainStore(tmp_path, boot_id="boot-1").save(DrainReason.PREEMPTION, "TRUE", 2.0)
    assert DrainStore(tmp_path, boot_id="boot-1").load().reason is DrainReason.PREEMPTION
    assert DrainStore(tmp_path, boot_id="boot-2").load() is None


def test_clear_removes_the_record_and_leaves_no_temp_files(tmp_path: Path) -> None:
    store = DrainStore(tmp_path / "nested", boot_id="b")
    store.save(DrainReason.ADMIN, "x", 1.0)
    store.save(DrainReason.ADMIN, "y", 2.0)
    assert json.loads(store.path.read_text())["detail"] == "y"
    store.clear()
    store.clear()  # idempotent
    assert store.load() is None
    assert list((tmp_path / "nested").iterdir()) == []


@pytest.mark.parametrize("content", ["{", "[]", '{"reason": "bogus", "started_at_wall": 1}', '{"reason": "admin"}'])
def test_corrupt_state_file_is_a_clear_error(tmp_path: Path, content: str) -> None:
    store = DrainStore(tmp_path, boot_id="b")
    store.path.write_text(content)
    with pytest.raises(StateFileError, match="drain.json"):
        store.load()
    assert store.path.read_text() == content  # nothing lost


def test_signal_and_idle_drains_are_not_persisted() -> None:
    assert not DrainStore.persists(DrainReason.SIGNAL)
    assert not DrainStore.persists(DrainReason.IDLE)
    assert DrainStore.persists(DrainReason.ADMIN)
    assert DrainStore.persists(DrainReason.PREEMPTION)


@pytest.mark.parametrize(
    ("reason", "deadline_wall", "expected_s"),
    [
        (DrainReason.PREEMPTION, 1012.0, 12.0),  # what is left of the notice
        (DrainReason.MAINTENANCE, 990.0, 0.0),  # already past: end at once
        (DrainReason.GPU_FAULT, 5000.0, 120.0),  # never longer than the configured timeout
        (DrainReason.PREEMPTION, None, 120.0),  # a record from before deadlines were saved
        (DrainReason.ADMIN, 990.0, 120.0),  # an admin drain restored days later starts afresh
    ],
)
def test_a_restored_drain_keeps_what_is_left_of_its_deadline(tmp_path: Path, reason, deadline_wall, expected_s) -> None:
    DrainStore(tmp_path, boot_id="b").save(reason, "x", 900.0, deadline_wall)
    saved = DrainStore(tmp_path, boot_id="b").load()
    assert saved is not None and saved.deadline_wall == deadline_wall
    assert saved.deadline_s(120.0, now_wall=1000.0) == pytest.approx(expected_s)
