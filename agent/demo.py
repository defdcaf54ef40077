"""`gpu-node-agent demo`: the whole lifecycle on embedded simulators, no GPU or cloud.

A simulated vLLM (loading, then serving a traffic pattern), a load-balancer stand-in
that sends traffic only while /readyz is 200, simulated GPUs, a simulated metadata
server that issues a Spot preemption notice, and a local Cloud Monitoring sink. The
real daemon runs on them in this process; the demo prints what changes and a summary.

Timeline for a duration D: vLLM loads for 4 s; the preemption notice comes at D minus
the notice budget (30 s, or D/2 for a demo shorter than a minute); power-off (the
agent's SIGTERM) comes at D, so the demo takes D seconds of wall time.
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
from agent.demo_summary import summary
from agent.sim.metadata import FakeMetadataServer
from agent.sim.monitoring import FakeMetricService
from agent.sim.nvml import FakeNvml
from agent.sim.vllm import FakeVllm, TrafficPattern
from probes.gpu import GPU
from probes.vllm import VLLM
from state_machine import State, Transition

_STEP_S = 0.25
_LOADING_S = 4.0
MIN_DURATION_S = 20.0  # loading, a few seconds of traffic, one export round, a 10 s notice
MAX_DURATION_S = 3600.0
_SPOT_NOTICE_S = 30.0  # GCE Spot's default notice
_SAFETY_MARGIN_S = 2.0
_KV_CACHE_BYTES = 24e9  # what the two simulated 24 GB GPUs keep for vLLM's KV cache (configured: vLLM exports no size)


class Demo:
    def __init__(self, duration_s: float, out: TextIO) -> None:
        if not MIN_DURATION_S <= duration_s <= MAX_DURATION_S:
            raise ValueError(f"duration_s must be between {MIN_DURATION_S:g} and {MAX_DURATION_S:g}, not {duration_s:g}")
        self.duration_s = duration_s
        self.notice_budget_s = min(_SPOT_NOTICE_S, duration_s / 2)
        self.preempt_at_s = duration_s - self.notice_budget_s
        self.out = out
        self.t0 = time.monotonic()
        burst_start_s = max(_LOADING_S + 1, self.preempt_at_s - 6)
        self.live = TrafficPattern(
            seed=7, base_rps=2.0, peak_rps=10.0, period_s=duration_s, burst_start_s=burst_start_s, burst_s=4.0, burst_rps=20.0
        )
        self.closed = TrafficPattern(seed=7, base_rps=0.0, peak_rps=0.0, burst_rps=0.0)
        self.vllm = FakeVllm(engines=2, traffic=self.closed)
        self.metadata = FakeMetadataServer()
        self.sink = FakeMetricService()
        self.pushes_seen = 0
        self.nvml = FakeNvml(count=2)  # one GPU per engine
        self.nvml.set_all(memory_used_bytes=int(0.9 * self.nvml.gpus[0].memory_total_bytes))  # vLLM preallocates
        self.lb_admitting = False
        self.admitted_while_not_ready = 0
        self.lb_polls = 0
        self.notice_at_mono: float | None = None
        self.drain_started_mono: float | None = None
        self.series_seen: set[str] = set()

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
                self.say(
                    f"agent listening on http://127.0.0.1:{daemon.bound_port}  (vLLM at {self.vllm.url} is loading its model)"
                )
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
                "GPU_AGENT_INFERENCE__KV_CACHE_CAPACITY_BYTES": str(_KV_CACHE_BYTES),
                "GPU_AGENT_DRAIN__SAFETY_MARGIN_S": str(_SAFETY_MARGIN_S),
                "GPU_AGENT_PREEMPTION__NOTICE_BUDGET_S": str(self.notice_budget_s),
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
        signalled = False
        while not serving.done():
            elapsed = time.monotonic() - self.t0
            if elapsed >= _LOADING_S and self.vllm._runner is None:  # private: the demo owns the fake
                await self.vllm.accept()
                self.say("vLLM finished loading: /health answers 200")
            await self._load_balancer(http, readyz)
            if self.vllm._runner is not None:
                arrived = self.vllm.arrived_total
                self.vllm.simulate_step(_STEP_S)
                if self.lb_admitting and daemon.lifecycle.state is not State.READY:  # the LB's view lags /readyz
                    self.admitted_while_not_ready += self.vllm.arrived_total - arrived
            self._gpus_follow_load()
            if self.notice_at_mono is None and elapsed >= self.preempt_at_s:
                await self._preempt()
            self._show_pushes()
            if not signalled and elapsed >= self.duration_s:
                signalled = True
                self.say(f"power-off: the {self.notice_budget_s:g} s notice is over; systemd sends the agent SIGTERM")
                daemon.on_stop_signal("SIGTERM (demo power-off)")
            if elapsed >= next_report:
                next_report = elapsed + 2.0
                self.say(self._figures(daemon))
            if elapsed > self.duration_s + 20:  # the agent should long be gone: skip its waiting
                daemon.on_stop_signal("SIGTERM (demo overtime)")
                daemon.on_stop_signal("SIGTERM (demo overtime)")
            await asyncio.sleep(_STEP_S)

    async def _preempt(self) -> None:
        self.notice_at_mono = time.monotonic()
        real = "" if self.notice_budget_s == _SPOT_NOTICE_S else f"; GCE gives {_SPOT_NOTICE_S:g} s, shortened to fit the demo"
        self.say(
            f"!! metadata server: instance/preempted = TRUE (Spot preemption: power-off in {self.notice_budget_s:g} s{real})"
        )
        await self.metadata.set("instance/preempted", "TRUE")

    async def _load_balancer(self, http: aiohttp.ClientSession, readyz: str) -> None:
        """Polls /readyz like a real LB health check and sends traffic only while 200."""
        self.lb_polls += 1
        try:
            async with http.get(readyz, timeout=aiohttp.ClientTimeout(total=1)) as resp:
                admit = resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            admit = False
        if admit != self.lb_admitting:
            self.say(
                f"load balancer: {'sending traffic' if admit else 'stopped sending traffic'} "
                f"(/readyz {'200' if admit else '503'})"
            )
        self.lb_admitting = admit
        self.vllm.traffic = self.live if admit else self.closed

    def _show_pushes(self) -> None:
        """Print each CreateTimeSeries the sink accepted, as what would reach Cloud Monitoring
        (the latest point of every series; agent/state only for the current state)."""
        calls = [c for c in self.sink.calls_of("CreateTimeSeries") if c.code == "OK"]
        if len(calls) == self.pushes_seen:
            return
        self.pushes_seen = len(calls)
        latest = {}
        for point in self.sink.points:
            latest[point.key] = point
            self.series_seen.add(point.metric_type.removeprefix("custom.googleapis.com/"))
        shown = [p for p in latest.values() if not (p.metric_type.endswith("agent/state") and p.value == 0)]
        shown.sort(key=lambda p: (p.metric_type, sorted(p.metric_labels.items())))
        self.say(
            f"pushed to Cloud Monitoring (local sink), request {len(calls)}: "
            f"{len(shown)} series on {shown[0].resource_type if shown else '-'}"
        )
        for point in shown:
            labels = ",".join(f"{k}={v}" for k, v in sorted(point.metric_labels.items()))
            print(
                f"          {point.metric_type.removeprefix('custom.googleapis.com/')}"
                f"{'{' + labels + '}' if labels else ''} = {point.value:g}",
                file=self.out,
            )

    def _gpus_follow_load(self) -> None:
        for index, running in enumerate(self.vllm.running):
            busy = 0 if running == 0 else min(99, 35 + 2 * running)
            self.nvml.set(index, utilization_percent=busy, temperature_c=38 + busy // 3, power_mw=16_000 + busy * 500)

    def _on_transition(self, transition: Transition) -> None:
        if transition.to_state is State.DRAINING and self.drain_started_mono is None:
            self.drain_started_mono = time.monotonic()
        self.say(
            f"STATE {transition.from_state.value} -> {transition.to_state.value}  reason={transition.reason}  {transition.detail}"
        )
        if transition.to_state is State.TERMINATED:
            self.say(f"the agent keeps answering /readyz 503 until its SIGTERM at power-off ({self.duration_s:g} s)")

    def _figures(self, daemon: Daemon) -> str:
        vllm = daemon.snapshot.value(VLLM)
        gpu = daemon.snapshot.value(GPU)
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


class _DemoLog(logging.Handler):
    """The agent's warnings as demo lines (timestamped like the rest), not raw stderr."""

    _PLAIN = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime", "taskName"}

    def __init__(self, demo: Demo) -> None:
        super().__init__(logging.WARNING)
        self.demo = demo

    def emit(self, record: logging.LogRecord) -> None:
        extras = [f"{k}={v}" for k, v in record.__dict__.items() if k not in self._PLAIN and isinstance(v, (str, int, float))]
        self.demo.say(
            f"agent {record.levelname.lower()} ({record.name}): {record.getMessage()}"
            + (f" [{', '.join(extras)}]" if extras else "")
        )


def run_demo(duration_s: float) -> int:
    demo = Demo(duration_s, sys.stdout)
    root = logging.getLogger()
    root.handlers[:] = [_DemoLog(demo)]
    root.setLevel(logging.WARNING)
    logging.getLogger("probes.base").setLevel(logging.ERROR)  # vLLM refusing while it loads is the story, not a warning
    demo.say(
        f"gpu-node-agent demo: {demo.duration_s:g} s on simulators (no GPU, no cloud); "
        f"preemption notice at {demo.preempt_at_s:g} s"
    )
    try:
        import uvloop

        status = uvloop.run(demo.run())
    except ImportError:
        status = asyncio.run(demo.run())
    print(summary(status, demo))
    return 0
