"""The fault bench's inputs and report are what they claim: padded vLLM expositions
are valid text the agent's parser reads, with the series where a real server puts
them; the unit's limits are read from the unit file; each summary row carries the
figure, its same-run baseline and the goal."""

from __future__ import annotations

import resource
from pathlib import Path

from agent.sim.vllm import FakeVllm
from bench import fault_report
from bench.bench_faults import QUICK, ClientCase, ScrapeRun
from bench.fault_harness import Attacked, AttackRun, memory_max_bytes, unit_nofile
from bench.loadgen import LoadResult
from bench.run_all import _SUMMARY
from bench.vllm_child import extra_lines, loaded, long_line, padded
from probes.prom_text import PromParser

FAMILY = "vllm:request_success_total"


def test_extra_series_sit_inside_their_family_and_parse() -> None:
    plain = loaded(FakeVllm(model="m")).render_metrics()
    body = padded(plain, extra_lines("m", 1000))
    assert body.count(b"\n") == plain.count(b"\n") + 1000
    samples = PromParser().parse_bytes(body).samples
    reasons = {s.labels["finished_reason"] for s in samples if s.name == FAMILY}
    assert {"stop", "length", "abort", "r0", "r999"} <= reasons and len(reasons) == 1003
    names = [s.name for s in samples]
    first, last = names.index(FAMILY), len(names) - names[::-1].index(FAMILY)
    assert set(names[first:last]) == {FAMILY}  # one contiguous block: the family is not split


def test_long_line_is_the_size_asked_and_parses() -> None:
    line = long_line("m", 100_000)[0]
    assert len(line) == 100_000
    body = padded(loaded(FakeVllm(model="m")).render_metrics(), [line])
    # Well-formed exposition (the agent refuses it as too large, by its line cap, not as garbage).
    sample = next(
        s for s in PromParser(max_line_chars=200_000).parse_bytes(body).samples if len(s.labels.get("finished_reason", "")) > 1000
    )
    assert sample.value == 1.0 and sample.labels["model_name"] == "m"


def test_unit_limits_come_from_the_unit_file(tmp_path: Path) -> None:
    unit = tmp_path / "agent.service"
    unit.write_text("[Service]\nMemoryMax=1G\nLimitNOFILE=1000:2000\n")
    assert memory_max_bytes(unit) == 1024**3
    assert unit_nofile(unit)[:2] == (1000, 2000)


def test_a_unit_without_limit_nofile_gets_65536_capped_at_this_machine(tmp_path: Path) -> None:
    unit = tmp_path / "agent.service"
    unit.write_text("[Service]\nMemoryMax=512M\n")
    ceiling = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    soft, hard, note = unit_nofile(unit)
    assert (soft, hard) == (min(65536, ceiling), min(65536, ceiling))
    assert "sets no LimitNOFILE" in note
    assert memory_max_bytes(unit) == 512 * 1024**2


def _load(p99_ms: float | None, errors: int = 0, **errors_by: int) -> LoadResult:
    kinds = {"connect": 0, "status": 0, "closed": 0, "protocol": 0, "timeout": 0, "unsent": 0, **errors_by}
    p = None if p99_ms is None else p99_ms / 2
    return LoadResult(1000, 1000 - errors, 1000 - errors, errors, kinds, p, p, p99_ms, p99_ms, p99_ms, 0.1)


def test_report_puts_each_figure_next_to_its_baseline_and_goal() -> None:
    case = ClientCase("b", "2,500 idle connections, fd limit 1024", "b. idle", "idle", (), 8, (1024, 1024))
    dead = AttackRun(
        _load(0.7),
        _load(None, 1000, closed=1000),
        _load(2.0),
        [(10.5, False)],
        [(20.0, True)],
        Attacked(proc=None, ready={"answered_200": 1008}),
        10.0,
        60 * 2**20,
        65 * 2**20,
        1024,
        ("1024", "1024"),
        True,
    )
    scrape = [
        ScrapeRun("the plain one", 13_000, _load(1.9), (83, 9000, 0.01), 57 * 2**20, True),
        ScrapeRun("+ 100,000 distinct-label lines", 8_300_000, _load(1043.2), (100_083, 7 * 2**20, 0.5), 600 * 2**20, True),
    ]
    text = fault_report.render(
        {"clients": [(case, dead)], "scrapes": scrape, "notices": {"clean": [0.003] * 5, "prelude": [8.0, 12.0, None]}},
        QUICK,
        "python -m bench.bench_faults --quick",
        "machine",
    )
    rows = _SUMMARY.findall(text)
    assert rows[0] == (
        "faults b: /readyz p99 during 2,500 idle connections, fd limit 1024 (quiet: 0.7 ms)",
        "no answers, errors 100% (closed 1000); RSS max 65 MB; /healthz first failure at +0.5 s",
        "<= 50 ms, 0 errors, RSS < 256 MB",
    )
    assert rows[1] == (
        "faults d: /readyz p99 while vLLM serves 100,000 distinct-label lines (baseline: 1.9 ms)",
        "1043.2 ms; agent /metrics 100,083 lines; RSS over MemoryMax",
        "<= 20 ms; agent /metrics lines fixed",
    )
    assert rows[2][1] == ">= 44.34 s (1 not seen within 45 s)" and "clean path p99 3.0 ms" in rows[2][0]
    assert "| 0/1 (first failure at +0.5 s) / 1/1 |" in text
