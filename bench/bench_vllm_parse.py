"""Cost of one vLLM scrape on the agent's side: our parser next to prometheus_client's
on the same 4-engine exposition, and our whole per-scrape path (parse + summarize +
window + derive; the probe parses only the sample names it reads, shown next to
parsing every line), measured side by side in one process.

    python -m bench.bench_vllm_parse [--repetitions 7] [--scrapes 200] [--engines 4]

The exposition has every family a vLLM 0.12 V1 server serves per engine (names,
labels and bucket boundaries from vllm/v1/metrics/loggers.py), rendered by
prometheus_client like vLLM does, with traffic from the FakeVllm simulation.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from agent.sim.vllm import FakeVllm, TrafficPattern
from bench.common import machine_header, summary_line
from bench.v1_families import FullV1Vllm
from probes.prom_text import PromParser
from probes.vllm_metrics import SAMPLE_NAMES, ScrapeAccumulator, VllmWindow


def exposition(engines: int, steps: int) -> tuple[FakeVllm, Callable[[], str]]:
    """A simulated node and a function rendering its full /metrics text."""
    fake = FullV1Vllm(engines=engines, traffic=TrafficPattern(seed=1))
    for _ in range(steps):
        fake.simulate_step(1.0)
    return fake, lambda: fake.render_metrics().decode()


def per_scrape_s(fn: Callable[[int], object], scrapes: int) -> float:
    started = time.perf_counter()
    for i in range(scrapes):
        fn(i)
    return (time.perf_counter() - started) / scrapes


def measure(engines: int, scrapes: int, repetitions: int) -> tuple[dict[str, list[float]], int, int]:
    fake, render = exposition(engines, 90)
    texts = []
    for _ in range(8):  # a few successive scrapes: same series, moving values, like a live server
        fake.simulate_step(1.0)
        texts.append(render())
    warm = PromParser()

    def derived(names: frozenset[str] | None) -> Callable[[int], None]:
        """Parse (every line, or only `names`, as the probe does) + summarize + window + derive."""
        window = VllmWindow(60)

        def one(i: int) -> None:
            acc = ScrapeAccumulator()
            for batch in warm.batches(texts[i % len(texts)], 25, names=names):
                acc.feed(batch)
            window.add(float(i), acc.finish())
            window.derive(2.0, 0.1)

        return one

    contenders: dict[str, Callable[[int], object]] = {
        "prometheus_client parse": lambda i: list(text_string_to_metric_families(texts[i % len(texts)])),
        "ours parse (cold cache)": lambda i: PromParser().parse(texts[i % len(texts)]),
        "ours parse (warm cache)": lambda i: warm.parse(texts[i % len(texts)]),
        "ours, every line + summarize + window + derive": derived(None),
        "the probe's path: only the names it reads + summarize + window + derive": derived(SAMPLE_NAMES),
    }
    results: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repetitions):
        for name, fn in contenders.items():  # interleaved, so drift hits every contender alike
            results[name].append(per_scrape_s(fn, scrapes))
    return results, len(texts[0]), texts[0].count("\n")


def report(results: dict[str, list[float]], size: int, lines: int, args: argparse.Namespace) -> str:
    base = results["prometheus_client parse"]
    full = results[next(name for name in results if name.startswith("the probe's path"))]
    rows = [
        f"| {name} | {statistics.median(times) * 1e3:.2f} ms | {statistics.median([b / t for b, t in zip(base, times, strict=False)]):.1f}× | {statistics.median(times) * 100:.2f} % |"
        for name, times in results.items()
    ]
    return "\n".join(
        [
            f"### vLLM /metrics: parse and derive, {args.engines} engines ({lines} lines, {size / 1024:.0f} KiB)",
            "",
            f"`python -m bench.bench_vllm_parse --repetitions {args.repetitions} --scrapes {args.scrapes} --engines {args.engines}` — {machine_header()}",
            "",
            f"Median of {args.repetitions} repetitions of {args.scrapes} scrapes each; speed-up is the median of per-repetition ratios to prometheus_client's parser, measured side by side.",
            "",
            "| per scrape | time (this machine) | speed-up vs prometheus_client | share of one core at 1 scrape/s |",
            "|---|---|---|---|",
            *rows,
            summary_line(
                f"vLLM scrape parse + derive vs prometheus_client's parser ({args.engines} engines)",
                f"{statistics.median([b / t for b, t in zip(base, full, strict=False)]):.1f}× faster ({statistics.median(full) * 100:.2f} % of a core at 1 scrape/s)",
                "—",
            ),
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--scrapes", type=int, default=200)
    parser.add_argument("--engines", type=int, default=4)
    args = parser.parse_args()
    results, size, lines = measure(args.engines, args.scrapes, args.repetitions)
    print(report(results, size, lines, args))


if __name__ == "__main__":
    main()
