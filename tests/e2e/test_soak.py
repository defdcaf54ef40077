"""Soak (marked, not in the default run): 30 minutes of random faults, then no
leaks and no stuck state. `SOAK_MINUTES` shortens it.

    python -m pytest -m soak tests/e2e/test_soak.py
"""

from __future__ import annotations

import os

import pytest

from tests.e2e.soak import run_soak

pytestmark = pytest.mark.soak


async def test_thirty_minutes_of_faults_leak_nothing_and_end_ready() -> None:
    minutes = float(os.environ.get("SOAK_MINUTES", "30"))
    result = await run_soak(minutes * 60)
    assert result.faults_injected > minutes * 10
    assert result.final_state == "READY"
    assert result.rss_end - result.rss_start < 8 * 1024 * 1024, result
    assert result.second_half_growth() < 1024 * 1024, result.rss_samples
    assert result.process_end["asyncio_tasks"] <= result.process_start["asyncio_tasks"] + 2, result
    assert result.process_end["open_fds"] <= result.process_start["open_fds"] + 5, result
    assert result.process_end["threads"] <= result.process_start["threads"] + 2, result
