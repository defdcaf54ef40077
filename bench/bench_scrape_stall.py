"""The event loop's longest gap during one vLLM scrape: the probe as the agent runs it
(the GET sent and read on a thread, probes/offloop_http.py) next to the same probe
with the GET on the loop (probes.http.get_capped, aiohttp, as the other probes do),
in one process against the same FakeVllm child process, alternating.

A ticker task yields to the loop in a tight loop and records the gaps between its
turns while one `VllmMetricsProbe.sample()` runs; a trial's figure is its longest
gap. The ticker's own floor is the longest gap over the same span with no scrape.

    python -m bench.bench_scrape_stall [--trials 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import uvloop

from bench.common import machine_header, median, percentile, start_child, summary_line
from probes.http import get_capped
from probes.offloop_http import OffLoopGet
from probes.vllm import VllmMetricsProbe

# (label, vllm_child args)
EXPOSITIONS = [
    ("4 engines, every V1 family", ["--engines", "4", "--full-v1"]),
    ("4 engines, FakeVllm's families", ["--engines", "4"]),
    ("1 engine, every V1 family", ["--engines", "1", "--full-v1"]),
]
CLIENTS = ("off the loop (the agent)", "aiohttp on the loop")
_PAUSE_S = 0.05  # between trials: the child's render and our parse are done


class OnLoopGet:
    """probes.http.get_capped behind OffLoopGet's interface."""

    def __init__(self, base_url: str, session: aiohttp.ClientSession) -> None:
        self._base, self._session = base_url, session

    async def get(self, path: str, **kwargs: Any) -> bytes:
        return await get_capped(self._session, self._base + path, **kwargs)  # type: ignore[no-any-return]


async def longest_gap_ms(work: Callable[[], Awaitable[object]]) -> tuple[float, float]:
    """(longest loop gap while `work` runs, how long it ran), both in ms."""
    gaps: list[float] = []
    done = asyncio.Event()

    async def tick() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.002)
    gaps.clear()
    started = time.perf_counter()
    await work()
    took = time.perf_counter() - started
    done.set()
    await ticker
    return max(gaps, default=0.0) * 1000, took * 1000


async def measure(child_args: list[str], trials: int, rounds: int) -> dict[str, list[float]]:
    vllm = await start_child("bench.vllm_child", *child_args)
    results: dict[str, list[float]] = {name: [] for name in (*CLIENTS, "floor")}
    try:
        async with contextlib.AsyncExitStack() as stack:
            session = await stack.enter_async_context(aiohttp.ClientSession())
            offloop = OffLoopGet(vllm.url)
            stack.callback(offloop.close)
            probes = {CLIENTS[0]: VllmMetricsProbe(offloop), CLIENTS[1]: VllmMetricsProbe(OnLoopGet(vllm.url, session))}  # type: ignore[arg-type]
            for probe in probes.values():
                await probe.sample()  # connections open, parser caches warm
            for _ in range(rounds):
                for name, probe in probes.items():
                    for _ in range(trials // rounds):
                        gap, took = await longest_gap_ms(probe.sample)
                        results[name].append(gap)
                        floor, _ = await longest_gap_ms(lambda took=took: asyncio.sleep(took / 1000))
                        results["floor"].append(floor)
                        await asyncio.sleep(_PAUSE_S)
    finally:
        vllm.stop()
    return results


def report(all_results: dict[str, dict[str, list[float]]], trials: int, rounds: int) -> str:
    lines = [
        f"### Longest event-loop gap during one vLLM scrape ({trials} scrapes per client and exposition)",
        "",
        f"`python -m bench.bench_scrape_stall --trials {trials} --rounds {rounds}` — {machine_header()}",
        "",
        "One process, one FakeVllm child per exposition; the agent's probe (GET on its own thread) and the same probe "
        "with aiohttp's GET on the loop take turns, "
        f"{trials // rounds} scrapes each, {rounds} times. The figure is each scrape's longest gap between two turns of a "
        "ticker task (what a /readyz arriving then waits, at most); the floor is the ticker's longest gap over the same "
        "span with nothing running.",
        "",
        "| exposition | GET | longest gap per scrape: median | p90 | max | the ticker's floor (median) |",
        "|---|---|---|---|---|---|",
    ]
    for label, results in all_results.items():
        floor = median(results["floor"])
        for name in CLIENTS:
            gaps = sorted(results[name])
            lines.append(
                f"| {label} | {name} | {median(gaps):.2f} ms | {percentile(gaps, 0.9):.2f} ms | {gaps[-1]:.2f} ms | {floor:.3f} ms |"
            )
    lines.append("")
    for label, results in all_results.items():
        ours, theirs = (f"{median(results[c]):.2f} / {percentile(results[c], 0.9):.2f} ms" for c in CLIENTS)
        lines.append(
            summary_line(
                f"longest loop gap per vLLM scrape, median / p90 ({label}): GET off the loop (the agent) vs on it",
                f"{ours} vs {theirs}",
                "—",
            )
        )
    return "\n".join(lines)


async def main_async(trials: int, rounds: int) -> dict[str, dict[str, list[float]]]:
    return {label: await measure(args, trials, rounds) for label, args in EXPOSITIONS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(report(uvloop.run(main_async(args.trials, args.rounds)), args.trials, args.rounds))


if __name__ == "__main__":
    main()
