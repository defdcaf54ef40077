"""The demo runs the whole lifecycle on the simulators, takes the time it is given, and
its output adds up: integer counts that reconcile, headers that count what they list,
every series type the README lists, and no stray unformatted lines. One 20 s run is
shared by the tests below (out-of-range durations: tests/agent/test_cli.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from agent.demo_summary import README_SERIES
from tests.harness import REPO

DURATION_S = 20


@pytest.fixture(scope="module")
def demo() -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "agent", "demo", "--duration", str(DURATION_S)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=90,
    )
    return result, time.monotonic() - started


def summary_of(out: str) -> str:
    return out[out.index("\nsummary\n") :]


def test_demo_runs_the_lifecycle_and_ends_by_itself(demo) -> None:
    result, _ = demo
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "transitions: INIT -> WARMING -> READY -> DRAINING -> TERMINATED" in out
    assert "reason=preemption" in out
    assert "requests admitted while not ready: 0" in out
    assert "termination report in the sink: yes" in out
    assert "vllm/queue_length" in out and "gpu/usage_percent" in out


def test_the_demo_takes_the_duration_it_is_given(demo) -> None:
    _, took = demo
    assert DURATION_S <= took < DURATION_S + 6  # + interpreter start, imports and the final flush


def test_request_counts_are_integers_that_add_up(demo) -> None:
    summary = summary_of(demo[0].stdout)
    assert not re.search(r"\d\.0\b", summary), summary  # counts are whole numbers
    notice = re.search(r"requests: (\d+) in flight at the agent's own vLLM reading at the notice", summary)
    after = re.search(r"\+ (\d+) that arrived after it, before the load balancer saw /readyz 503", summary)
    total = re.search(r"= (\d+) = (\d+) completed \+ (\d+) aborted", summary)
    assert notice and after and total, summary
    assert int(notice[1]) + int(after[1]) == int(total[1]) == int(total[2]) + int(total[3])
    report = re.search(
        r"termination report: preemption drain, \w+ after [\d.]+ s: (\d+) in flight at the notice, "
        r"(\d+) completed, (\d+) aborted",
        summary,
    )
    assert report and (report[1], report[2], report[3]) == (notice[1], total[2], total[3])


def test_each_push_header_counts_the_series_it_lists(demo) -> None:
    lines = demo[0].stdout.splitlines()
    headers = [(i, int(m[1])) for i, line in enumerate(lines) if (m := re.search(r"request \d+: (\d+) series on", line))]
    assert len(headers) >= 2
    for i, count in headers:
        listed = 0
        while i + 1 + listed < len(lines) and lines[i + 1 + listed].startswith("          "):
            listed += 1
        assert listed == count, lines[i]


def test_every_series_type_the_readme_lists_is_written(demo) -> None:
    out = demo[0].stdout
    assert f"series types: all {len(README_SERIES)} that the README lists were written" in summary_of(out)
    assert re.search(r"^ +vllm/kv_cache_usage_gb = [\d.]+$", out, re.MULTILINE)  # the demo configures a cache size
    readme = (REPO / "README.md").read_text()
    for name in README_SERIES:
        short = name.removeprefix("agent/termination/")
        assert name in readme or (short != name and short in readme), name


def test_every_line_is_the_demos_own_and_nothing_reaches_stderr(demo) -> None:
    result, _ = demo
    assert result.stderr == ""
    body = result.stdout[: result.stdout.index("\nsummary\n")]
    for line in body.splitlines():
        assert re.match(r"\[ *\d+\.\ds\] |          \S", line), f"stray line: {line!r}"
    assert re.search(r"\] agent warning \(agent\.policy\.preemption\): metadata notice", body)
