"""Steady RSS and CPU of the idle daemon (polling a fake vLLM every second, nothing
in flight) next to `python -c "import asyncio"`, measured side by side.

    python -m bench.bench_idle [--seconds 30] [--features core|all]
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from agent.sim.vllm import FakeVllm
from bench.common import AgentProcess, machine_header, summary_line


def _usage(pid: int) -> tuple[float, float]:
    proc = psutil.Process(pid)
    times = proc.cpu_times()
    return times.user + times.system, proc.memory_info().rss


async def measure(seconds: float, settings: dict[str, str]) -> dict[str, float]:
    vllm = FakeVllm()
    await vllm.start()
    baseline = subprocess.Popen([sys.executable, "-c", "import asyncio, time; time.sleep(3600)"])
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(Path(tmp), {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url, "GPU_AGENT_INFERENCE__POLL_INTERVAL_S": "1", **settings}).start()
        try:
            await agent.started()
            await asyncio.sleep(5)  # let imports, first scrapes and caches settle
            assert agent.proc is not None
            cpu0, rss0 = _usage(agent.proc.pid)
            base_cpu0, _ = _usage(baseline.pid)
            t0 = time.monotonic()
            await asyncio.sleep(seconds)
            elapsed = time.monotonic() - t0
            cpu1, rss1 = _usage(agent.proc.pid)
            base_cpu1, base_rss = _usage(baseline.pid)
        finally:
            agent.kill()
            baseline.kill()
            baseline.wait()
            await vllm.stop()
    return {
        "agent_rss_start": rss0,
        "agent_rss_end": rss1,
        "base_rss": base_rss,
        "agent_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        "base_cpu_pct": 100 * (base_cpu1 - base_cpu0) / elapsed,
        "seconds": elapsed,
    }


def report(r: dict[str, float], label: str) -> str:
    mb = 1024 * 1024
    return "\n".join(
        [
            f"### Idle daemon ({label}) next to a bare interpreter, {r['seconds']:.0f} s",
            "",
            f"`python -m bench.bench_idle --seconds {r['seconds']:.0f}` — {machine_header()}",
            "",
            "| | agent | `python -c 'import asyncio'` | ratio |",
            "|---|---|---|---|",
            f"| RSS | {r['agent_rss_end'] / mb:.1f} MB (start of window {r['agent_rss_start'] / mb:.1f} MB) | {r['base_rss'] / mb:.1f} MB | {r['agent_rss_end'] / r['base_rss']:.1f}× |",
            f"| CPU (% of one core) | {r['agent_cpu_pct']:.2f} % | {r['base_cpu_pct']:.2f} % | — |",
            summary_line(f"idle daemon RSS ({label}) vs a bare interpreter", f"{r['agent_rss_end'] / mb:.1f} MB vs {r['base_rss'] / mb:.1f} MB ({r['agent_rss_end'] / r['base_rss']:.1f}×)", "—"),
            summary_line(f"idle daemon CPU ({label})", f"{r['agent_cpu_pct']:.2f} % of one core", "—"),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30)
    args = parser.parse_args()
    print(report(asyncio.run(measure(args.seconds, {})), "core: health + vLLM metrics at 1 s"))


if __name__ == "__main__":
    main()
