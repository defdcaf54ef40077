"""RSS, tasks, threads and descriptors of the agent over an accelerated soak with
random faults (polls every 50 ms, a fault every ~0.5 s): start vs end.

    python -m bench.bench_soak_rss [--minutes 10]
"""

from __future__ import annotations

import argparse
import asyncio

from bench.common import machine_header, summary_line
from tests.e2e.soak import run_soak


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--minutes", type=float, default=10)
    args = parser.parse_args()
    r = asyncio.run(run_soak(args.minutes * 60))
    mb = 1024 * 1024
    growth = (r.rss_end - r.rss_start) / mb
    late = r.second_half_growth() / mb
    timeline = r.rss_samples[:: max(1, len(r.rss_samples) // 10)]
    if timeline[-1] is not r.rss_samples[-1]:
        timeline.append(r.rss_samples[-1])
    print(
        "\n".join(
            [
                f"### Accelerated soak, {r.seconds / 60:.1f} min, {r.faults_injected} faults injected",
                "",
                f"`python -m bench.bench_soak_rss --minutes {args.minutes:g}` — {machine_header()}",
                "",
                "The agent polls vLLM every 50 ms (20× the default rate) while the fake vLLM refuses, hangs, answers garbage, "
                "truncated, oversized and 503 bodies, restarts its counters, and admin drains come and go.",
                "",
                "| | start | end |",
                "|---|---|---|",
                f"| RSS | {r.rss_start / mb:.1f} MB | {r.rss_end / mb:.1f} MB ({growth:+.1f} MB; over the second half {late:+.1f} MB) |",
                f"| asyncio tasks | {r.process_start['asyncio_tasks']} | {r.process_end['asyncio_tasks']} |",
                f"| threads | {r.process_start['threads']} | {r.process_end['threads']} |",
                f"| open fds | {r.process_start['open_fds']} | {r.process_end['open_fds']} |",
                f"| state after faults stop | | {r.final_state} |",
                "",
                "RSS over the run (the baseline is taken after every fault path has run once; see tests/e2e/soak.py):",
                "",
                "| minute | " + " | ".join(f"{t / 60:.1f}" for t, _ in timeline) + " |",
                "|---|" + "---|" * len(timeline),
                "| RSS MB | " + " | ".join(f"{rss / mb:.1f}" for _, rss in timeline) + " |",
                summary_line(
                    f"RSS over a {r.seconds / 60:.0f}-min accelerated fault soak",
                    f"{r.rss_start / mb:.1f} -> {r.rss_end / mb:.1f} MB ({growth:+.1f} MB; second half {late:+.1f} MB)",
                    "no growth",
                ),
            ]
        )
    )


if __name__ == "__main__":
    main()
