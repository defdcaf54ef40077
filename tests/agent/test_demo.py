"""The demo runs the whole lifecycle on the simulators and ends by itself."""

from __future__ import annotations

import subprocess
import sys
import time

from tests.harness import REPO


def test_demo_runs_the_lifecycle_and_ends_by_itself() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--duration", "20"], cwd=REPO, capture_output=True, text=True, timeout=90
    )
    took = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "transitions: INIT -> WARMING -> READY -> DRAINING -> TERMINATED" in out
    assert "reason=preemption" in out
    assert "requests admitted while not ready: 0" in out
    assert "termination report in the sink: yes" in out
    assert "vllm/queue_length" in out and "gpu/usage_percent" in out
    assert took < 60
