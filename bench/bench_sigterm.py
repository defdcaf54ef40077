"""SIGTERM -> first 503 from /readyz, over N trials of a real `gpu-node-agent run`.

    python -m bench.bench_sigterm [--trials 50]

A poller sends back-to-back /readyz requests on one keep-alive connection; the
reaction time is from os.kill() to the first 503 it receives.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import tempfile
from pathlib import Path

import aiohttp

from agent.sim.vllm import FakeVllm
from bench.common import (
    AgentProcess,
    fmt_ms,
    machine_header,
    percentile,
    summary_line,
    until,
)
from tests.harness import status_is, time_to_first_503


async def one_trial(vllm_url: str, tmp: Path) -> float:
    agent = AgentProcess(tmp, {"GPU_AGENT_INFERENCE__BASE_URL": vllm_url}).start()
    try:
        await agent.started()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            url = f"{agent.url}/readyz"
            await until(lambda: status_is(session, url, 200), 20, 0.05, "READY")
            return await time_to_first_503(session, url, lambda: agent.send(signal.SIGTERM))
    finally:
        agent.kill()


async def run(trials: int) -> list[float]:
    vllm = FakeVllm()
    await vllm.start()
    reactions = []
    try:
        for _ in range(trials):
            with tempfile.TemporaryDirectory() as tmp:
                reactions.append(await one_trial(vllm.url, Path(tmp)))
    finally:
        await vllm.stop()
    return reactions


def report(reactions: list[float]) -> str:
    return "\n".join(
        [
            f"### SIGTERM -> first 503 on /readyz ({len(reactions)} trials)",
            "",
            f"`python -m bench.bench_sigterm --trials {len(reactions)}` — {machine_header()}",
            "",
            "| p50 | p99 | max | target |",
            "|---|---|---|---|",
            f"| {fmt_ms(percentile(reactions, 0.5))} | **{fmt_ms(percentile(reactions, 0.99))}** | {fmt_ms(max(reactions))} | p99 <= 20 ms |",
            summary_line(
                f"SIGTERM -> first 503 on /readyz, p99 of {len(reactions)} trials",
                fmt_ms(percentile(reactions, 0.99)),
                "<= 20 ms",
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    print(report(asyncio.run(run(args.trials))))


if __name__ == "__main__":
    main()
