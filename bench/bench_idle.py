"""Steady RSS and CPU of the idle daemon (polling a fake vLLM every second, nothing
in flight; the fake serves every V1 family, bench/v1_families.py, as a real server
does) next to `python -c "import asyncio"`, measured side by side.

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

from agent.sim.metadata import FakeMetadataServer
from agent.sim.monitoring import FakeMetricService
from bench.common import AgentProcess, machine_header, summary_line
from bench.v1_families import FullV1Vllm


def _usage(pid: int) -> tuple[float, float]:
    proc = psutil.Process(pid)
    times = proc.cpu_times()
    return times.user + times.system, proc.memory_info().rss


async def measure(seconds: float, features: str) -> dict[str, float]:
    all_features = features != "core"
    vllm = FullV1Vllm(engines=4 if all_features else 1)
    await vllm.start()
    meta, sink = FakeMetadataServer(), FakeMetricService()
    await meta.start()
    await sink.start()
    for engine in range(vllm.engines):
        vllm.set_load(running=12, waiting=3, engine=engine)
        for _ in range(50):
            vllm.observe_request(engine=engine)
    baseline = subprocess.Popen([sys.executable, "-c", "import asyncio, time; time.sleep(3600)"])
    settings = {"GPU_AGENT_INFERENCE__BASE_URL": vllm.url, "GPU_AGENT_INFERENCE__POLL_INTERVAL_S": "1"}
    argv = None
    if all_features:
        settings.update({
            "GPU_AGENT_GPU__ENABLED": "true", "GPU_AGENT_GPU__POLL_INTERVAL_S": "1",
            "GPU_AGENT_PREEMPTION__ENABLED": "true", "GCE_METADATA_HOST": meta.address,
            "GPU_AGENT_EXPORT__ENABLED": str(features == "all").lower(), "GPU_AGENT_EXPORT__ENDPOINT": sink.endpoint,
            "GPU_AGENT_EXPORT__INSECURE": "true", "GPU_AGENT_EXPORT__INTERVAL_S": "10",
            "GPU_AGENT_HOST__POLL_INTERVAL_S": "5",
        })
        argv = [sys.executable, "-m", "bench.agent_all_features"]
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(Path(tmp), settings, argv=argv).start()
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
            await meta.stop()
            await sink.stop()
    return {
        "agent_rss_start": rss0,
        "agent_rss_end": rss1,
        "base_rss": base_rss,
        "agent_cpu_pct": 100 * (cpu1 - cpu0) / elapsed,
        "base_cpu_pct": 100 * (base_cpu1 - base_cpu0) / elapsed,
        "seconds": elapsed,
    }


def report(r: dict[str, float], label: str, args: argparse.Namespace) -> str:
    mb = 1024 * 1024
    return "\n".join(
        [
            f"### Steady daemon ({label}) next to a bare interpreter, {r['seconds']:.0f} s",
            "",
            f"`python -m bench.bench_idle --seconds {args.seconds:g} --features {args.features}` — {machine_header()}",
            "",
            "| | agent | `python -c 'import asyncio'` | ratio |",
            "|---|---|---|---|",
            f"| RSS | {r['agent_rss_end'] / mb:.1f} MB (start of window {r['agent_rss_start'] / mb:.1f} MB) | {r['base_rss'] / mb:.1f} MB | {r['agent_rss_end'] / r['base_rss']:.1f}× |",
            f"| CPU (% of one core) | {r['agent_cpu_pct']:.2f} % | {r['base_cpu_pct']:.2f} % | — |",
            summary_line(
                f"daemon RSS, {args.features} features, vs a bare interpreter",
                f"{r['agent_rss_end'] / mb:.1f} MB vs {r['base_rss'] / mb:.1f} MB ({r['agent_rss_end'] / r['base_rss']:.1f}×)",
                "<= 90 MB" if args.features != "core" else "—",
            ),
            summary_line(
                f"daemon CPU, {args.features} features, 1 s scrape and NVML intervals",
                f"{r['agent_cpu_pct']:.2f} % of one core",
                "<= 2 %" if args.features != "core" else "—",
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--features", choices=["core", "signals", "all"], default="all")
    args = parser.parse_args()
    label = {
        "all": "every feature: health + 4-engine vLLM scrape + 8 fake GPUs at 1 s, host at 5 s, metadata watch, export every 10 s",
        "signals": "node signals: health + 4-engine vLLM scrape + 8 fake GPUs at 1 s, host at 5 s, metadata watch; no export",
        "core": "core: health + vLLM metrics at 1 s",
    }[args.features]
    print(report(asyncio.run(measure(args.seconds, args.features)), label, args))


if __name__ == "__main__":
    main()
