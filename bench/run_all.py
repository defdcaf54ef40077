"""Runs every benchmark of the project and rewrites bench/RESULTS.md: machine, date,
commit, a summary table at the top, then each benchmark's own section.

    python -m bench.run_all [--quick] [--only NAME ...]

Each benchmark is a module run as its own process (`python -m bench.NAME ARGS`) that
prints a markdown section and `<!-- summary: what | result | target -->` rows.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

from bench.common import REPO, machine_header

# (module, full-run args, quick args)
BENCHES: list[tuple[str, list[str], list[str]]] = [
    ("bench_sigterm", ["--trials", "50"], ["--trials", "10"]),
    (
        "bench_readyz",
        ["--rate", "2000", "--seconds", "2.5", "--rounds", "12"],
        ["--rate", "1000", "--seconds", "2", "--rounds", "1"],
    ),
    ("bench_scrape_stall", ["--trials", "60", "--rounds", "3"], ["--trials", "12", "--rounds", "2"]),
    ("bench_idle", ["--seconds", "60", "--features", "all"], ["--seconds", "5", "--features", "all"]),
    ("bench_idle", ["--seconds", "60", "--features", "signals"], ["--seconds", "5", "--features", "signals"]),
    ("bench_idle", ["--seconds", "30", "--features", "core"], ["--seconds", "5", "--features", "core"]),
    ("bench_vllm_parse", ["--repetitions", "7", "--scrapes", "200"], ["--repetitions", "2", "--scrapes", "20"]),
]
OPTIONAL = [
    ("bench_scenarios", [], []),
    ("bench_preemption", ["--trials", "50"], ["--trials", "10"]),
    ("bench_export", [], ["--quick"]),
    ("bench_soak_rss", ["--minutes", "10"], ["--minutes", "1"]),
    ("bench_cli", ["--runs", "30"], ["--runs", "10"]),
    ("bench_faults", [], ["--quick"]),
]
_SUMMARY = re.compile(r"<!-- summary: (.*?) \| (.*?) \| (.*?) -->")


def available() -> list[tuple[str, list[str], list[str]]]:
    extra = [b for b in OPTIONAL if (REPO / "bench" / f"{b[0]}.py").exists()]
    return BENCHES + extra


def run_one(module: str, args: list[str], timeout_s: float) -> tuple[str, list[tuple[str, str, str]]]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", f"bench.{module}", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout_s
    )
    took = time.monotonic() - started
    if proc.returncode != 0:
        section = f"### {module}: FAILED (exit {proc.returncode})\n\n```\n{proc.stderr[-3000:]}\n```"
        return section, [(module, f"FAILED (exit {proc.returncode})", "")]
    print(f"{module}: done in {took:.0f} s", file=sys.stderr)
    return proc.stdout.strip(), _SUMMARY.findall(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small runs, to check the benches work")
    parser.add_argument("--only", nargs="*", help="module names to run")
    parser.add_argument("--output", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args()
    sections, rows = [], []
    for module, full, quick in available():
        if args.only and module not in args.only:
            continue
        section, summary = run_one(module, quick if args.quick else full, timeout_s=1800)
        sections.append(section)
        rows.extend(summary)
    footer = fleet_section(REPO / "bench" / "FLEET.md")
    rows.extend(_SUMMARY.findall("\n".join(footer)))
    header = [
        "# Benchmark results",
        "",
        f"Written by `python -m bench.run_all{' --quick' if args.quick else ''}` — {machine_header()}.",
        "",
        "Every number comes from a script in bench/ and each section names the command that reproduces it.",
        "These machines are shared, noisy 2-core VMs: read the ratios (measured side by side in one run), not the absolute times.",
        "",
        "## Summary",
        "",
        "| what | result | target |",
        "|---|---|---|",
        *[f"| {what} | {result} | {target} |" for what, result, target in rows],
        "",
    ]
    args.output.write_text("\n".join(header) + "\n" + "\n\n".join(sections) + "\n" + "\n".join(footer) + "\n")
    print(f"wrote {args.output}", file=sys.stderr)


def fleet_section(fleet_md: Path) -> list[str]:
    """The fleet simulation's results table, plot and verdict, copied from FLEET.md
    (written by `python -m bench.fleet_sim`, which takes minutes, so run_all does not
    rerun it); FLEET.md keeps the method, the ablations and the reasoning."""
    if not fleet_md.exists():
        return []
    text = fleet_md.read_text()
    results = _section(text, "## Results")
    verdict = _section(text, "## Conclusion").split("\n\n")[0]
    return [
        "",
        "### Fleet autoscaling: which signal to scale on",
        "",
        "Method, ablations and the reasoning behind the verdict: [FLEET.md](FLEET.md).",
        "",
        results.replace("#### ", "##### "),
        "",
        verdict,
    ]


def _section(markdown: str, heading: str) -> str:
    body = markdown.split(heading + "\n", 1)[1]
    return body.split("\n## ", 1)[0].strip()


if __name__ == "__main__":
    main()
