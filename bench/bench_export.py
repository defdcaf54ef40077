"""Cost of the Cloud Monitoring export on the agent's side: CPU time per push for a
node with 8 GPUs and every vLLM series, and the requests each interval costs.

    python -m bench.bench_export [--repetitions 5] [--pushes 200] [--outage 10] [--quick]

The exporter runs its real path (snapshot -> series -> TimeSeries protos -> the
real google-cloud-monitoring async client -> gRPC) against FakeMetricService in
a separate process, so the server's work is not counted: `time.process_time()`
of this process (all its threads, gRPC's included) is the agent's cost. The
replay after an outage runs against an in-process fake that can go down.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace
from typing import Any

from agent.config import ExportConfig
from agent.core.snapshot import Snapshot
from agent.exporter import series as s
from agent.exporter.push_loop import Exporter, Tuning
from agent.node_view import NodeViews, node_view
from agent.sim.monitoring import FakeMetricService
from bench.common import REPO, machine_header, summary_line
from probes.gpu import GpuInfo, GpuReading
from probes.vllm import VllmReading
from state_machine import State

GPUS = 8
PROJECT = "bench-project"


def node() -> tuple[Snapshot, Any]:
    snapshot = Snapshot()
    gpus = [
        GpuInfo(index=i, utilization_percent=70.0 + i, memory_used_bytes=70_000_000_000, memory_total_bytes=80_000_000_000)
        for i in range(GPUS)
    ]
    snapshot.put("gpu", GpuReading.of(gpus), stale_after_s=1e9)
    q = {"p50": 0.12, "p95": 0.48, "p99": 0.91}
    snapshot.put(
        "vllm",
        VllmReading(
            requests_running=48,
            requests_waiting=12,
            in_flight=60,
            kv_cache_usage_ratio=0.62,
            kv_cache_capacity_bytes=4.0e11,
            kv_cache_used_bytes=2.5e11,
            kv_capacity_source="configured",
            prompt_tokens_per_s=9000.0,
            generation_tokens_per_s=4100.0,
            ttft_s=q,
            tpot_s={"p50": 0.021, "p95": 0.034, "p99": 0.05},
            e2e_s=q,
            goodput_ratio=0.97,
            requests_finished_total={"stop": 1e5},
            requests_completed_total=1e5,
            requests_aborted_total=3,
            window_s=60,
            engines=8,
            models=("m",),
            metric_names="v1",
            engine_sleeping=False,
        ),
        stale_after_s=1e9,
    )
    return snapshot, SimpleNamespace(state=State.READY)


class SteppedWall:
    """Ten seconds per push, starting 20 h ago: inside the API's 25 h window."""

    def __init__(self, step_s: float) -> None:
        self.now, self.step_s = time.time() - 20 * 3600, step_s

    def __call__(self) -> float:
        return self.now


def pure_per_push_s(pushes: int) -> float:
    snapshot, lifecycle = node()
    labels = {"project_id": PROJECT, "instance_id": "1", "zone": "z"}
    started = time.process_time()
    for i in range(pushes):
        points = s.series_points(s.node_metrics(node_view(snapshot, lifecycle.state)))
        s.create_request(PROJECT, s.time_series_protos(points, "gce_instance", labels, 1.8e9 + 10 * i))
    return (time.process_time() - started) / pushes


async def push_costs(endpoint: str, repetitions: int, pushes: int) -> dict[str, Any]:
    snapshot, lifecycle = node()
    wall = SteppedWall(10.0)
    cfg = ExportConfig(
        project_id=PROJECT, insecure=True, endpoint=endpoint, interval_s=10, resource="generic_node", node_id="bench"
    )
    exporter = Exporter(cfg, NodeViews(snapshot, lifecycle, None), wall=wall, environ={}, tuning=Tuning(identity_wait_s=0))
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await exporter.push_once()
    first = (time.process_time() - cpu0, time.perf_counter() - wall0, dict(exporter.stats.requests_total))
    cpu, elapsed = [], []
    for _ in range(repetitions):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(pushes):
            wall.now += wall.step_s
            await exporter.push_once()
        cpu.append((time.process_time() - cpu0) / pushes)
        elapsed.append((time.perf_counter() - wall0) / pushes)
    health = exporter.health()
    await exporter.close()
    assert not health["failures_by_code"], health
    requests = exporter.stats.requests_total["OK"] - first[2].get("OK", 0)
    per_push = len(s.series_points(s.node_metrics(node_view(snapshot, lifecycle.state))))
    return {
        "first": first,
        "cpu": cpu,
        "wall": elapsed,
        "requests_per_push": requests / (repetitions * pushes),
        "series_per_request": per_push,
    }


async def replay(outage_intervals: int, replay_interval_s: float) -> dict[str, Any]:
    wall = SteppedWall(60.0)
    fake = await FakeMetricService(wall=time.time).start()
    snapshot, lifecycle = node()
    cfg = ExportConfig(
        project_id=PROJECT, insecure=True, endpoint=fake.endpoint, interval_s=60, resource="generic_node", node_id="replay"
    )
    exporter = Exporter(
        cfg,
        NodeViews(snapshot, lifecycle, None),
        wall=wall,
        environ={},
        tuning=Tuning(retry_base_s=0.01, retry_cap_s=0.02, replay_interval_s=replay_interval_s, identity_wait_s=0),
    )
    try:
        await exporter.push_once()
        fake.unavailable = True
        for _ in range(outage_intervals):
            wall.now += wall.step_s
            await exporter.push_once()
        fake.unavailable = False
        before = len(fake.calls_of("CreateTimeSeries"))
        wall.now += wall.step_s
        started = time.perf_counter()
        await exporter.push_once()
        took = time.perf_counter() - started
        sent = [c for c in fake.calls_of("CreateTimeSeries")[before:] if c.code == "OK"]
        ends = [p.end_wall for p in fake.series(s.VLLM_QUEUE)]
        assert ends == sorted(set(ends)) and len(ends) == outage_intervals + 2, "replay lost or reordered points"
        return {"requests": len(sent), "took_s": took, "dropped": exporter.points_total["dropped"]}
    finally:
        await exporter.close()
        await fake.stop()


def start_fake() -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen([sys.executable, "-m", "agent.sim.monitoring"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    return proc, json.loads(line)["endpoint"]


def share(seconds: float, interval_s: float) -> str:
    return f"{seconds / interval_s * 100:.4f} %"


def report(args: argparse.Namespace, pure_s: float, costs: dict[str, Any], replayed: dict[str, Any]) -> str:
    cpu, elapsed = statistics.median(costs["cpu"]), statistics.median(costs["wall"])
    first_cpu, first_wall, _ = costs["first"]
    descriptors = len(s.DESCRIPTORS)
    quick = " --quick" if args.quick else ""
    return "\n".join(
        [
            f"### Cloud Monitoring export: {GPUS} GPUs and every vLLM series",
            "",
            f"`python -m bench.bench_export{quick}` (--repetitions {args.repetitions} --pushes {args.pushes} --outage {args.outage}) — {machine_header()}",
            "",
            "The real exporter and google-cloud-monitoring client, over gRPC to FakeMetricService in another process: the CPU is this process's only (all threads).",
            f"Median of {args.repetitions} repetitions of {args.pushes} pushes.",
            "",
            "| per push | CPU (this machine) | wall | share of one core at interval 60 s | at 10 s |",
            "|---|---|---|---|---|",
            f"| snapshot -> series -> protos (pure) | {pure_s * 1e3:.3f} ms | — | {share(pure_s, 60)} | {share(pure_s, 10)} |",
            f"| whole push: + client + gRPC round trip | {cpu * 1e3:.3f} ms | {elapsed * 1e3:.2f} ms | {share(cpu, 60)} | {share(cpu, 10)} |",
            f"| first round: {descriptors} descriptors + the push | {first_cpu * 1e3:.1f} ms | {first_wall * 1e3:.1f} ms | once | once |",
            "",
            "| requests | count |",
            "|---|---|",
            f"| CreateTimeSeries per interval, steady state | {costs['requests_per_push']:.2f} ({costs['series_per_request']} series per request; the API's limit is 200) |",
            f"| CreateMetricDescriptor | {descriptors}, once at start |",
            f"| replay after {args.outage} intervals down | {replayed['requests']} requests (one per batch) paced {args.replay_interval_s:g} s apart: {replayed['took_s']:.2f} s, nothing dropped ({replayed['dropped']}) |",
            summary_line(
                f"export push, {GPUS} GPUs + all vLLM series (agent CPU)",
                f"{cpu * 1e3:.2f} ms per push ({share(cpu, 60)} of a core at 60 s), {costs['requests_per_push']:.0f} request per interval",
                "—",
            ),
        ]
    )


async def measure(args: argparse.Namespace, endpoint: str) -> tuple[dict[str, Any], dict[str, Any]]:
    costs = await push_costs(endpoint, args.repetitions, args.pushes)
    return costs, await replay(args.outage, args.replay_interval_s)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--pushes", type=int, default=200)
    parser.add_argument("--outage", type=int, default=10, help="intervals the API is down before the replay")
    parser.add_argument("--replay-interval-s", type=float, default=1.0)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logging.getLogger("agent.exporter").setLevel(logging.CRITICAL)  # the outage is on purpose
    if args.quick:
        args.repetitions, args.pushes, args.outage, args.replay_interval_s = 2, 30, 3, 0.2
    pure_s = statistics.median(pure_per_push_s(args.pushes) for _ in range(args.repetitions))
    proc, endpoint = start_fake()
    try:
        costs, replayed = asyncio.run(measure(args, endpoint))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(report(args, pure_s, costs, replayed))


if __name__ == "__main__":
    main()
