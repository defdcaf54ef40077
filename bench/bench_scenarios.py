"""Requests lost in the whole-node scenarios (tests/e2e): runs them with the LB
stand-in recording every scenario's outcome, and tabulates admitted, completed and
failed requests. Goal: 0 lost wherever the agent drained the node.

    python -m bench.bench_scenarios
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.common import REPO, machine_header, summary_line

# A crashed vLLM loses what it was serving before anyone can know: not the agent's to save.
_CRASH = "test_vllm_crash_and_recovery_under_traffic"


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        outcomes = Path(tmp) / "outcomes.jsonl"
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/e2e"],
            cwd=REPO, capture_output=True, text=True, env={**os.environ, "E2E_OUTCOMES_FILE": str(outcomes)}, timeout=900,
        )
        rows = [json.loads(line) for line in outcomes.read_text().splitlines()] if outcomes.exists() else []
    summary_tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "no output"
    lost_drained = sum(r["failed"] for r in rows if _CRASH not in r["scenario"])
    table = [
        f"| {r['scenario'].split('::')[-1]} | {r['admitted']} | {r['completed']} | {r['failed']} | {r['admitted_while_unhealthy']} |"
        for r in rows
    ]
    print(
        "\n".join(
            [
                "### Requests lost in the whole-node scenarios",
                "",
                f"`python -m bench.bench_scenarios` — {machine_header()}; pytest: {summary_tail}",
                "",
                "| scenario | admitted by the LB | completed | failed | sent while the LB held the node unready |",
                "|---|---|---|---|---|",
                *table,
                "",
                "A failed request in the vLLM-crash scenario was in flight or sent in the moment vLLM died (before the "
                "LB's unhealthy threshold); every other scenario drains through the agent and must lose none.",
                summary_line(
                    "requests lost in the drained scenarios (SIGTERM, preemption, outage, metadata faults)",
                    str(lost_drained),
                    "0",
                ),
            ]
        )
    )
    if proc.returncode != 0:
        print(proc.stdout[-3000:], file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
