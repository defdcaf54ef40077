"""/readyz latency at a fixed rate, measured by the C open-loop driver (bench/loadgen.c),
for the bare aiohttp app and the agent scraping a 1-engine and a 4-engine FakeVllm
every second, in alternating rounds; ratios per round and their median. The bare
app's own p99 is the measuring tool's floor and is printed next to each ratio.

    python -m bench.bench_readyz [--rate 2000] [--seconds 5] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from bench.common import agent_under_test, machine_header, median, start_child, summary_line
from bench.loadgen import LoadResult, drive

ENGINES = (1, 4)
_SETTLE_S = 2.0  # after READY: first scrapes, caches and imports done


def checked(name: str, result: LoadResult) -> LoadResult:
    if result.errors:
        raise RuntimeError(f"{name}: {result.errors} of {result.requests} requests failed ({result.errors_by})")
    return result


async def run(rate: float, seconds: float, rounds: int) -> list[dict[str, LoadResult]]:
    """One dict per round: "bare", "agent1", "agent4", measured one after the other."""
    async with contextlib.AsyncExitStack() as stack:
        children = [await start_child("bench.baseline_app", "0")]
        stack.callback(children[0].stop)
        targets = {"bare": children[0].url}
        for engines in ENGINES:
            vllm = await start_child("bench.vllm_child", "--engines", str(engines))
            stack.callback(vllm.stop)
            subject = await stack.enter_async_context(agent_under_test(vllm.url, settle_s=_SETTLE_S))
            targets[f"agent{engines}"] = subject.agent.url
        results = []
        for _ in range(rounds):
            results.append({name: checked(name, await drive(f"{url}/readyz", rate, seconds)) for name, url in targets.items()})
        return results


def ratios(results: list[dict[str, LoadResult]], name: str, field: str) -> list[float]:
    return [getattr(r[name], field) / getattr(r["bare"], field) for r in results]


def report(results: list[dict[str, LoadResult]], rate: float, seconds: float) -> str:
    rounds = len(results)
    floor_p99 = [r["bare"].p99_ms for r in results]
    lines = [
        f"### /readyz latency at {rate:g} req/s ({rounds} rounds × {seconds:g} s per target, alternating)",
        "",
        f"`python -m bench.bench_readyz --rate {rate:g} --seconds {seconds:g} --rounds {rounds}` — {machine_header()}",
        "",
        "Measured by bench/loadgen.c (open loop, latency from each request's due time, 8 keep-alive connections). "
        "Three servers run throughout: the bare aiohttp app, an agent scraping a 1-engine FakeVllm every 1 s and one scraping "
        "a 4-engine FakeVllm (each FakeVllm in its own process); each round measures them one after the other, so all three "
        "share the same background. The bare app's p99 is the driver's floor; the driver's send lag (from when a request "
        "was due and a connection free to when it went out) is its own lateness, mostly time without a CPU on this box.",
        "",
        "| round | bare app p50 / p99 (the driver's floor; its own send lag p99) | agent 1 engine p50 / p99 | ratio p99 | agent 4 engines p50 / p99 | ratio p99 |",
        "|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(results, 1):
        cells = [f"{i}", f"{r['bare'].p50_ms:.2f} / {r['bare'].p99_ms:.2f} ms ({r['bare'].send_lag_p99_ms:.2f} ms)"]
        for engines in ENGINES:
            a = r[f"agent{engines}"]
            cells += [f"{a.p50_ms:.2f} / {a.p99_ms:.2f} ms", f"{a.p99_ms / r['bare'].p99_ms:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    r1, r4 = median(ratios(results, "agent1", "p99_ms")), median(ratios(results, "agent4", "p99_ms"))
    p50_1, p50_4 = median(ratios(results, "agent1", "p50_ms")), median(ratios(results, "agent4", "p50_ms"))
    lines += [
        f"| **median of ratios** | floor p99 {median(floor_p99):.2f} ms | p50 ratio {p50_1:.2f}× | **{r1:.2f}×** | p50 ratio {p50_4:.2f}× | **{r4:.2f}×** (target <= 1.5) |",
        "",
        "Absolute numbers are this noisy 2-core machine's; the ratios, measured side by side, are the result.",
        summary_line(f"/readyz p99 at {rate:g} req/s vs a bare aiohttp app", f"{r4:.2f}×", "<= 1.5×"),
        summary_line(
            f"/readyz p99 at {rate:g} req/s vs a bare aiohttp app, 1 engine (driver floor: bare p99 {median(floor_p99):.2f} ms)",
            f"{r1:.2f}×",
            "—",
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(report(asyncio.run(run(args.rate, args.seconds, args.rounds)), args.rate, args.seconds))


if __name__ == "__main__":
    main()
