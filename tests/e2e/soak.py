"""The soak scenario, shared by the marked soak test and bench/bench_soak_rss.py:
the agent runs against a fake vLLM that injects random faults (seeded); RSS, asyncio
tasks, threads and open descriptors are read at start and end, and the node must
come back to READY once the faults stop."""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil

from agent.sim.vllm import FakeVllm, Fault
from tests.harness import AgentProcess, get_json, post_json, until

_FAULTS = [Fault.OK, Fault.OK, Fault.OK, Fault.GARBAGE, Fault.HANG, Fault.SLOW, Fault.HTTP_503, Fault.TRUNCATED, Fault.OVERSIZED]


@dataclass
class SoakResult:
    seconds: float
    rss_start: int
    rss_end: int
    process_start: dict
    process_end: dict
    faults_injected: int
    final_state: str
    rss_samples: list[tuple[float, int]]  # (seconds since the baseline, RSS bytes), about every 30 s

    def second_half_growth(self) -> int:
        """RSS growth over the second half of the run: a leak keeps growing there, while
        one-time costs (first drain, first oversized body under load) land early."""
        middle = next(rss for t, rss in self.rss_samples if t >= self.seconds / 2)
        return self.rss_end - middle


async def run_soak(duration_s: float, *, seed: int = 1, interval_s: float = 0.05, settle_s: float = 20.0) -> SoakResult:
    """Accelerated: the agent polls every `interval_s`; a fault changes every ~0.5 s."""
    rng = random.Random(seed)
    vllm = FakeVllm(engines=2)
    vllm.delay_s = 0.3
    vllm.oversized_bytes = 9 * 1024 * 1024
    await vllm.start()
    with tempfile.TemporaryDirectory() as tmp:
        agent = AgentProcess(
            Path(tmp),
            {
                "GPU_AGENT_INFERENCE__BASE_URL": vllm.url,
                "GPU_AGENT_INFERENCE__POLL_INTERVAL_S": str(interval_s),
                "GPU_AGENT_INFERENCE__TIMEOUT_S": "0.2",
            },
        ).start()
        faults = 0
        try:
            await agent.started()
            proc = psutil.Process(agent.proc.pid)
            async with aiohttp.ClientSession() as http:
                await _ready(http, agent)
                faults += await _warm_up(vllm, http, agent, interval_s)
                start = (await get_json(http, f"{agent.url}/status"))[1]["process"]
                rss_start = proc.memory_info().rss
                t0 = time.monotonic()
                samples = [(0.0, rss_start)]
                while time.monotonic() - t0 < duration_s:
                    if time.monotonic() - t0 - samples[-1][0] >= 30:
                        samples.append((time.monotonic() - t0, proc.memory_info().rss))
                    faults += await _inject(rng, vllm, http, agent)
                    vllm.set_load(rng.randint(0, 40), rng.randint(0, 10), engine=rng.randint(0, 1))
                    vllm.observe_request(engine=rng.randint(0, 1), ttft_s=rng.random(), tpot_s=rng.random() / 10)
                    await asyncio.sleep(0.5)
                vllm.set_fault(Fault.OK)
                if vllm._runner is None:  # private: the soak owns the fake
                    await vllm.accept()
                await post_json(http, f"{agent.url}/resume")
                await _ready(http, agent, settle_s)
                await asyncio.sleep(2)
                end_status = (await get_json(http, f"{agent.url}/status"))[1]
                rss_end = proc.memory_info().rss
        finally:
            agent.kill()
            await vllm.stop()
    samples.append((time.monotonic() - t0, rss_end))
    return SoakResult(
        time.monotonic() - t0, rss_start, rss_end, start, end_status["process"], faults, end_status["state"], samples
    )


async def _warm_up(vllm: FakeVllm, http: aiohttp.ClientSession, agent: AgentProcess, interval_s: float) -> int:
    """Walk every fault path once before the baseline: the first oversized body leaves
    the allocator holding a buffer the size of `metrics_max_bytes` (glibc raises its
    mmap threshold after freeing one that large), and every bounded buffer must be at
    its cap: one-time costs, not growth."""
    faults = 0
    for fault in _FAULTS:
        for target in ("health", "metrics"):
            vllm.set_fault(fault, target=target)
            faults += 1
            await asyncio.sleep(0.6)
    vllm.set_fault(Fault.OK)
    await vllm.refuse()
    await asyncio.sleep(0.5)
    await vllm.accept()
    vllm.restart()
    await post_json(http, f"{agent.url}/drain", {"reason": "soak warm-up"})
    await post_json(http, f"{agent.url}/resume")
    await _ready(http, agent)
    # The sliding window (probes/vllm_metrics.py: 60 s, at most 1024 scrapes) fills
    # up from empty after the counter restart above; let it reach its cap.
    await asyncio.sleep(min(60.0, 1024 * interval_s) + 3)
    return faults + 4


async def _ready(http: aiohttp.ClientSession, agent: AgentProcess, timeout_s: float = 20) -> None:
    async def ready() -> bool:
        return (await get_json(http, f"{agent.url}/readyz"))[0] == 200

    await until(ready, timeout_s, 0.1, "READY")


async def _inject(rng: random.Random, vllm: FakeVllm, http: aiohttp.ClientSession, agent: AgentProcess) -> int:
    roll = rng.random()
    if roll < 0.05:
        if vllm._runner is None:
            await vllm.accept()
        else:
            await vllm.refuse()
        return 1
    if roll < 0.08:
        await post_json(http, f"{agent.url}/drain", {"reason": "soak"})
        return 1
    if roll < 0.12:
        await post_json(http, f"{agent.url}/resume")
        return 1
    if roll < 0.14:
        vllm.restart()  # counters reset
        return 1
    if roll < 0.45:
        vllm.set_fault(rng.choice(_FAULTS), target=rng.choice(["health", "metrics", "both"]))
        return 1
    return 0
