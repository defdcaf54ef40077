"""Preemption notice -> first 503 on /readyz, over N trials of a real agent watching
a fake metadata server with hanging GETs, next to what 2-second polling of
instance/preempted (the common approach) sees on the same server in the same trials.

    python -m bench.bench_preemption [--trials 50]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import aiohttp

from agent.sim.metadata import PREEMPTED, FakeMetadataServer
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

_POLL_S = 2.0


async def poller(url: str, seen: asyncio.Future[float], phase_s: float) -> None:
    """The common approach: GET instance/preempted every 2 s."""
    await asyncio.sleep(phase_s)
    async with aiohttp.ClientSession(headers={"Metadata-Flavor": "Google"}) as session:
        while not seen.done():
            async with session.get(url) as resp:
                if (await resp.text()).strip() == "TRUE":
                    seen.set_result(time.perf_counter())
                    return
            await asyncio.sleep(_POLL_S)


def watching_agent(vllm: FakeVllm, tmp: Path, meta: FakeMetadataServer) -> AgentProcess:
    """A started agent watching `meta` for preemption."""
    return AgentProcess(tmp, {
        "GPU_AGENT_INFERENCE__BASE_URL": vllm.url,
        "GPU_AGENT_PREEMPTION__ENABLED": "true",
        "GCE_METADATA_HOST": meta.address,
    }).start()


async def one_trial(vllm: FakeVllm, tmp: Path, rng: random.Random) -> tuple[float, float]:
    meta = FakeMetadataServer()
    await meta.start()
    agent = watching_agent(vllm, tmp, meta)
    seen: asyncio.Future[float] = asyncio.get_running_loop().create_future()
    polling = asyncio.create_task(
        poller(f"http://{meta.address}/computeMetadata/v1/instance/preempted", seen, rng.uniform(0, _POLL_S))
    )
    try:
        await agent.started()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            url = f"{agent.url}/readyz"
            await until(lambda: status_is(session, url, 200), 20, 0.05, "READY")
            await until(lambda: len(meta.served("instance/preempted")) >= 2, 5, 0.01, "hanging GET in place")
            await asyncio.sleep(rng.uniform(0, 0.5))
            noticed = time.perf_counter()
            reaction = await time_to_first_503(session, url, lambda: meta.set("instance/preempted", "TRUE"))
            polled = await asyncio.wait_for(seen, _POLL_S * 3) - noticed
            return reaction, polled
    finally:
        polling.cancel()
        agent.kill()
        await meta.stop()


PRELUDE = ("garbage", "503", "reset", "garbage", "503")


def hanging(meta: FakeMetadataServer) -> bool:
    """A hanging GET on instance/preempted has arrived; the fake runs in this process,
    so by the time it is recorded it is parked."""
    return any(r.query.get("wait_for_change") == "true" for r in meta.served(PREEMPTED))


async def bad_answers(meta: FakeMetadataServer, prelude: Sequence[str]) -> None:
    """The watch of instance/preempted gets `prelude` as its next answers. The first
    ends the hanging GET in place, so it is a garbage value (a hanging GET returns
    on a change); the rest are injected faults, served before any value."""
    assert prelude[0] == "garbage", "the parked hanging GET can only be ended by a (garbage) value"
    parked = len(meta.served(PREEMPTED))
    meta.inject(PREEMPTED, *prelude[1:])
    await meta.set(PREEMPTED, "garbage: neither TRUE nor FALSE")
    await until(lambda: len(meta.served(PREEMPTED)) > parked, 60, 0.005, "the watch's next request")
    await meta.set(PREEMPTED, "FALSE")  # the old value and ETag: the watch hangs again once the faults are spent
    await until(lambda: not meta.faults.get(PREEMPTED), 120, 0.005, "the prelude served")


async def prelude_trial(vllm: FakeVllm, tmp: Path, prelude: Sequence[str], gap_s: float, limit_s: float) -> float | None:
    """Seconds from instance/preempted=TRUE to the first /readyz 503 when the watch's
    last answers were `prelude` and the notice comes `gap_s` after the last of them;
    None if no 503 within `limit_s`."""
    meta = FakeMetadataServer()
    await meta.start()
    agent = watching_agent(vllm, tmp, meta)
    try:
        await agent.started()
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
            url = f"{agent.url}/readyz"
            await until(lambda: status_is(session, url, 200), 20, 0.05, "READY")
            await until(lambda: hanging(meta), 5, 0.01, "hanging GET in place")
            await bad_answers(meta, prelude)
            await asyncio.sleep(gap_s)
            try:
                return await time_to_first_503(session, url, lambda: meta.set(PREEMPTED, "TRUE"), limit_s)
            except AssertionError:
                return None
    finally:
        agent.kill()
        await meta.stop()


async def run_prelude(trials: int, prelude: Sequence[str], gap_s: float, limit_s: float) -> list[float | None]:
    vllm = FakeVllm()
    await vllm.start()
    try:
        results = []
        for _ in range(trials):
            with tempfile.TemporaryDirectory() as tmp:
                results.append(await prelude_trial(vllm, Path(tmp), prelude, gap_s, limit_s))
        return results
    finally:
        await vllm.stop()


async def run(trials: int, seed: int = 5) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    vllm = FakeVllm()
    await vllm.start()
    agent_s, polled_s = [], []
    try:
        for _ in range(trials):
            with tempfile.TemporaryDirectory() as tmp:
                a, p = await one_trial(vllm, Path(tmp), rng)
                agent_s.append(a)
                polled_s.append(p)
    finally:
        await vllm.stop()
    return agent_s, polled_s


def report(agent_s: list[float], polled_s: list[float]) -> str:
    return "\n".join(
        [
            f"### Preemption notice -> first 503 on /readyz ({len(agent_s)} trials)",
            "",
            f"`python -m bench.bench_preemption --trials {len(agent_s)}` — {machine_header()}",
            "",
            "The notice is `instance/preempted` flipping to TRUE on the fake metadata server. The agent holds a hanging GET "
            "(`wait_for_change`, `last_etag`); the 2-second poller (random phase) reads the same server in the same trials.",
            "",
            "| | p50 | p99 | max |",
            "|---|---|---|---|",
            f"| agent: notice -> first 503 on /readyz | {fmt_ms(percentile(agent_s, 0.5))} | **{fmt_ms(percentile(agent_s, 0.99))}** | {fmt_ms(max(agent_s))} |",
            f"| 2 s polling: notice -> poller sees TRUE (before any drain) | {fmt_ms(percentile(polled_s, 0.5))} | {fmt_ms(percentile(polled_s, 0.99))} | {fmt_ms(max(polled_s))} |",
            "",
            f"Target: p99 <= 20 ms. The agent is {percentile(polled_s, 0.5) / percentile(agent_s, 0.5):.0f}× faster at the median than 2-second polling.",
            summary_line(
                f"preemption notice -> first 503, p99 of {len(agent_s)} trials (2 s polling: p99)",
                f"{fmt_ms(percentile(agent_s, 0.99))} ({fmt_ms(percentile(polled_s, 0.99))})",
                "<= 20 ms",
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=50)
    args = parser.parse_args()
    print(report(*asyncio.run(run(args.trials))))


if __name__ == "__main__":
    main()
