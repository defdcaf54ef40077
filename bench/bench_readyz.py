"""/readyz latency at a fixed rate while the agent polls a fake vLLM every second,
against a minimal aiohttp app answering a constant 200, side by side in one run.

    python -m bench.bench_readyz [--rate 2000] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.sim.vllm import FakeVllm
from bench.common import (
    AgentProcess,
    fixed_rate_latencies,
    fmt_ms,
    machine_header,
    median,
    percentile,
    summary_line,
    until,
)


async def _baseline_url() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "bench.baseline_app", "0"], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = await asyncio.to_thread(proc.stdout.readline)
    return proc, f"http://127.0.0.1:{int(line.split()[1])}/readyz"


async def run(rate: float, seconds: float, rounds: int) -> dict[str, list[float]]:
    vllm = FakeVllm()
    await vllm.start()
    results: dict[str, list[float]] = {"agent_p50": [], "agent_p99": [], "base_p50": [], "base_p99": []}
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(Path(tmp), {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url, "GPU_AGENT_INFERENCE__POLL_INTERVAL_S": "1"}).start()
        baseline, base_url = await _baseline_url()
        try:
            await agent.started()
            import aiohttp

            async with aiohttp.ClientSession() as s:
                async def ready() -> bool:
                    async with s.get(f"{agent.url}/readyz") as r:
                        return r.status == 200

                await until(ready, 20, 0.1, "agent READY")
            for _ in range(rounds):
                for name, url in (("agent", f"{agent.url}/readyz"), ("base", base_url)):
                    latencies, errors = await fixed_rate_latencies(url, rate, seconds)
                    assert errors == 0, f"{name}: {errors} errors"
                    results[f"{name}_p50"].append(percentile(latencies, 0.5))
                    results[f"{name}_p99"].append(percentile(latencies, 0.99))
        finally:
            agent.kill()
            baseline.kill()
            baseline.wait()
            await vllm.stop()
    return results


def report(results: dict[str, list[float]], rate: float, seconds: float, rounds: int) -> str:
    ratio_p99 = [a / b for a, b in zip(results["agent_p99"], results["base_p99"])]
    ratio_p50 = [a / b for a, b in zip(results["agent_p50"], results["base_p50"])]
    return "\n".join(
        [
            f"### /readyz latency at {rate:g} req/s ({rounds} rounds × {seconds:g} s each, alternating)",
            "",
            f"`python -m bench.bench_readyz --rate {rate:g} --seconds {seconds:g} --rounds {rounds}` — {machine_header()}",
            "",
            "| | agent /readyz | bare aiohttp app | ratio (median of rounds) |",
            "|---|---|---|---|",
            f"| p50 | {fmt_ms(median(results['agent_p50']))} | {fmt_ms(median(results['base_p50']))} | {median(ratio_p50):.2f} |",
            f"| p99 | {fmt_ms(median(results['agent_p99']))} | {fmt_ms(median(results['base_p99']))} | **{median(ratio_p99):.2f}** (target <= 1.5) |",
            "",
            "Latency is measured from each request's scheduled time (open loop). Absolute numbers are this noisy 2-core machine's; the ratio is the result.",
            summary_line(f"/readyz p99 at {rate:g} req/s vs a bare aiohttp app", f"{median(ratio_p99):.2f}×", "<= 1.5×"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results = asyncio.run(run(args.rate, args.seconds, args.rounds))
    print(report(results, args.rate, args.seconds, args.rounds))


if __name__ == "__main__":
    main()
