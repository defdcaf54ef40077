"""`gpu-node-agent demo`: the whole lifecycle on embedded simulators, no GPU or cloud.

A simulated vLLM (loading, then serving a traffic pattern), a load-balancer stand-in
that sends traffic only while /readyz is 200, simulated GPUs, a simulated metadata
server that issues a Spot preemption notice, and a local Cloud Monitoring sink. The
real daemon runs on them in this process; the demo prints what changes and a summary.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

import aiohttp

from agent.config import load_config
from agent.daemon import Daemon
from agent.sim.metadata import FakeMetadataServer
from agent.sim.monitoring import FakeMetricService
from agent.sim.nvml import FakeNvml
from agent.sim.vllm import FakeVllm, TrafficPattern
from state_machine import State, Transition

_STEP_S = 0.25
_LOADING_S = 4.0


class Demo:
    def __init__(self, duration_s: float, out: TextIO) -> None:
        self.duration_s = max(20.0, duration_s)
        self.preempt_at_s = self.duration_s * 0.55
        self.out = out
        self.t0 = time.monotonic()
        self.live = TrafficPattern(seed=7, base_rps=2.0, peak_rps=10.0, period_s=self.duration_s, burst_start_s=self.duration_s * 0.35, burst_s=4.0, burst_rps=20.0)
        self.closed = TrafficPattern(seed=7, base_rps=0.0, peak_rps=0.0, burst_rps=0.0)
        self.vllm = FakeVllm(engines=2, traffic=self.closed)
        self.metadata = FakeMetadataServer()
        self.sink = FakeMetricService()
        self.pushes_seen = 0
        self.nvml = FakeNvml(count=2)  # one GPU per engine
        self.nvml.set_all(memory_used_bytes=int(0.9 * self.nvml.gpus[0].memory_total_bytes))  # vLLM preallocates
        self.ready_seen = 0
        self.lb_admitting = False
        self.admitted_while_not_ready = 0
        self.lb_polls = 0

    def say(self, text: str) -> None:
        print(f"[{time.monotonic() - self.t0:5.1f}s] {text}", file=self.out, flush=True)

    async def run(self) -> dict[str, Any]:
        await self.vllm.start()
        await self.vllm.refuse()  # loading the model: the port refuses connections
        await self.metadata.start()
        await self.sink.start()
        with tempfile.TemporaryDirectory(prefix="gpu-node-agent-demo-") as tmp:
            daemon = Daemon(self._config(Path(tmp)), environ={}, nvml=self.nvml)
            daemon.lifecycle.subscribe(self._on_transition)
            serving = asyncio.create_task(daemon.serve())
            try:
                await self._until_bound(daemon, serving)
                self.say(f"agent listening on http://127.0.0.1:{daemon.bound_port}  (vLLM at {self.vllm.url} is loading its model)")
                async with aiohttp.ClientSession() as http:
                    await self._drive(daemon, http, serving)
                async with asyncio.timeout(15):
                    await serving
            finally:
                if not serving.done():
                    serving.cancel()
                await self.vllm.stop()
                await self.metadata.stop()
                self._show_pushes()
                await self.sink.stop()
        return daemon.status()

    def _config(self, tmp: Path) -> Any:
        return load_config(
            None,
            {
                "GPU_AGENT_SERVICE__HOST": "127.0.0.1",
                "GPU_AGENT_SERVICE__PORT": "0",
                "GPU_AGENT_SERVICE__STATE_DIR": str(tmp / "state"),
                "GPU_AGENT_INFERENCE__BASE_URL": self.vllm.url,
                "GPU_AGENT_INFERENCE__POLL_INTERVAL_S": "0.25",
                "GPU_AGENT_INFERENCE__TIMEOUT_S": "1",
                "GPU_AGENT_DRAIN__PROPAGATION_DELAY_S": "1",
                "GPU_AGENT_DRAIN__SETTLE_S": "1",
                "GPU_AGENT_EXPORT__ENABLED": "true",  # to the local sink, never the real API
                "GPU_AGENT_EXPORT__ENDPOINT": self.sink.endpoint,
                "GPU_AGENT_EXPORT__INSECURE": "true",
                "GPU_AGENT_EXPORT__INTERVAL_S": "10",
                "GPU_AGENT_PREEMPTION__ENABLED": "true",
                "GPU_AGENT_PREEMPTION__METADATA_HOST": self.metadata.address,
                "GPU_AGENT_PREEMPTION__WATCH_TIMEOUT_S": "5",
                "GPU_AGENT_GPU__POLL_INTERVAL_S": "0.5",
            },
        )

    async def _until_bound(self, daemon: Daemon, serving: asyncio.Task[None]) -> None:
        while daemon.bound_port is None or daemon.lifecycle.state is State.INIT:
            if serving.done():
                await serving  # raises what stopped it
            await asyncio.sleep(0.02)

    async def _drive(self, daemon: Daemon, http: aiohttp.ClientSession, serving: asyncio.Task[None]) -> None:
        readyz = f"http://127.0.0.1:{daemon.bound_port}/readyz"
        next_report = 0.0
        preempted = False
        while not serving.done():
            elapsed = time.monotonic() - self.t0
            if elapsed >= _LOADING_S and self.vllm._runner is None:  # private: the demo owns the fake
                await self.vllm.accept()
                self.say("vLLM finished loading: /health answers 200")
            await self._load_balancer(http, readyz)
            if self.vllm._runner is not None:
                self.vllm.simulate_step(_STEP_S)
            self._gpus_follow_load()
            if not preempted and elapsed >= self.preempt_at_s:
                preempted = True
                self.say("!! metadata server: instance/preempted = TRUE (Spot preemption, 30 s to power-off)")
                await self.metadata.set("instance/preempted", "TRUE")
            self._show_pushes()
            if daemon.lifecycle.state is State.TERMINATED and not daemon._stop_requested.is_set():
                self.say("node TERMINATED; the agent keeps answering 503 until its own SIGTERM: sending it now")
                daemon.on_stop_signal("SIGTERM (demo)")
            if elapsed >= next_report:
                next_report = elapsed + 2.0
                self.say(self._figures(daemon))
            if elapsed > self.duration_s + 20:
                daemon.on_stop_signal("SIGTERM (demo overtime)")
                daemon.on_stop_signal("SIGTERM (demo overtime)")
            await asyncio.sleep(_STEP_S)

    async def _load_balancer(self, http: aiohttp.ClientSession, readyz: str) -> None:
        """Polls /readyz like a real LB health check and sends traffic only while 200."""
        self.lb_polls += 1
        try:
            async with http.get(readyz, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                admit = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            admit = False
        if admit != self.lb_admitting:
            self.say(f"load balancer: {'sending traffic' if admit else 'stopped sending traffic'} (/readyz {'200' if admit else '503'})")
        self.lb_admitting = admit
        self.vllm.traffic = self.live if admit else self.closed

    def _show_pushes(self) -> None:
        """Print each CreateTimeSeries the sink accepted, as what would reach Cloud Monitoring."""
        calls = [c for c in self.sink.calls_of("CreateTimeSeries") if c.code == "OK"]
        if len(calls) == self.pushes_seen:
            return
        self.pushes_seen = len(calls)
        latest = {}
        for point in self.sink.points:
            latest[point.key] = point
        shown = sorted(latest.values(), key=lambda p: (p.metric_type, sorted(p.metric_labels.items())))
        self.say(f"pushed to Cloud Monitoring (local sink), request {len(calls)}: {len(shown)} series on {shown[0].resource_type if shown else '-'}")
        for point in shown:
            labels = ",".join(f"{k}={v}" for k, v in sorted(point.metric_labels.items()))
            if point.metric_type.endswith("agent/state") and point.value == 0:
                continue
            print(f"          {point.metric_type.removeprefix('custom.googleapis.com/')}{'{' + labels + '}' if labels else ''} = {point.value:g}", file=self.out)

    def _gpus_follow_load(self) -> None:
        for index, running in enumerate(self.vllm.running):
            busy = 0 if running == 0 else min(99, 35 + 2 * running)
            self.nvml.set(index, utilization_percent=busy, temperature_c=38 + busy // 3, power_mw=16_000 + busy * 500)

    def _on_transition(self, transition: Transition) -> None:
        self.say(f"STATE {transition.from_state.value} -> {transition.to_state.value}  reason={transition.reason}  {transition.detail}")

    def _figures(self, daemon: Daemon) -> str:
        vllm = daemon.snapshot.value("vllm")
        gpu = daemon.snapshot.value("gpu")
        state = daemon.lifecycle.state.value
        gpus = "" if gpu is None else "  gpus " + "/".join(f"{g.utilization_percent or 0:.0f}%" for g in gpu.gpus)
        if vllm is None:
            return f"{state:<10} vLLM: no fresh metrics{gpus}"
        p95 = vllm.ttft_s.get("p95")
        tokens = vllm.generation_tokens_per_s
        return (
            f"{state:<10} queue {vllm.requests_waiting:>3.0f}  running {vllm.requests_running:>3.0f}  "
            f"kv {100 * (vllm.kv_cache_usage_ratio or 0):>3.0f}%  "
            f"{'-' if tokens is None else f'{tokens:.0f}'} tok/s  ttft p95 {'-' if p95 is None else f'{p95 * 1000:.0f} ms'}{gpus}"
        )


def _summary(status: dict[str, Any], demo: Demo) -> str:
    report = status.get("termination_report") or {}
    lines = [
        "",
        "summary",
        "  transitions: " + " -> ".join([status["history"][0]["from"]] + [t["to"] for t in status["history"]]),
        f"  final state: {status['state']} ({status['reason']})",
        f"  termination report: reason={report.get('reason')} outcome={report.get('outcome')} "
        f"in-flight at notice={report.get('in_flight_at_notice')} completed={report.get('completed')} "
        f"aborted={report.get('aborted')} drain={report.get('drain_s')}s",
        f"  load balancer polls: {demo.lb_polls}; requests admitted while not ready: {demo.admitted_while_not_ready}",
        f"  export: {status['exporter'].get('points_written')} points written in "
        f"{len([c for c in demo.sink.calls_of('CreateTimeSeries') if c.code == 'OK'])} requests; "
        f"termination report in the sink: {'yes' if any(p.metric_type.endswith('termination/count') for p in demo.sink.points) else 'no'}",
    ]
    return "\n".join(lines)


def run_demo(duration_s: float) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("transitions").setLevel(logging.WARNING)
    logging.getLogger("probes.base").setLevel(logging.ERROR)  # vLLM refusing while it loads is the story, not a warning
    demo = Demo(duration_s, sys.stdout)
    demo.say(f"gpu-node-agent demo: {demo.duration_s:.0f} s on simulators (no GPU, no cloud)")
    try:
        import uvloop

        status = uvloop.run(demo.run())
    except ImportError:
        status = asyncio.run(demo.run())
    print(_summary(status, demo))
    return 0
