"""Which signal to scale a vLLM fleet on: a trace-driven simulation of the fleet under
the MIG autoscaler and the HPA, each node running the agent's own metric code.

    python -m bench.fleet_sim [--quick] [--traces bench/traces/*.csv] [--seed 1]
                              [--jobs 2] [--plot PATH | --no-plot] [--ablation]

Compares, on the same arrivals: GPU utilization 80 % (gpu/usage_percent, target 80),
the waiting queue (vllm/queue_length, target 10 per node), p95 TTFT 2 s
(vllm/ttft_ms p95, target 2000) and the demand gauge (node/demand, target 1.0).
Prints a markdown section (the table and a verdict per trace, plus summary rows
for bench/run_all.py) and writes the plot. Method and parameters: bench/FLEET.md
and the docstrings of bench/fleet/. `--ablation` adds the demand gauge under
the other lifecycle rules (agent/demand.py explains the one the agent uses).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

from agent.demand import Series
from bench.common import summary_line
from bench.fleet.agent_view import StateRule
from bench.fleet.report import SLO_GOAL, plot, table
from bench.fleet.sim import Fleet, FleetParams, Kind, Policy, RunResult
from bench.fleet.trace import Trace, load_trace

REPO = Path(__file__).resolve().parent.parent
POLICIES = (
    Policy("gpu80", Series.GPU_USAGE_PERCENT, 80.0),
    Policy("queue10", Series.QUEUE_LENGTH, 10.0),
    Policy("ttft2s", Series.TTFT_P95_MS, 2000.0),
    Policy("demand", Series.DEMAND, 1.0),
)


def truncate(trace: Trace, hours: float) -> Trace:
    """The first `hours` of a trace (for --quick and the tests)."""
    end = hours * 3600.0
    n = sum(1 for t in trace.times_s if t <= end)

    def cut(values: tuple[float, ...] | None) -> tuple[float, ...] | None:
        return None if values is None else values[:n]

    return replace(trace, times_s=trace.times_s[:n], rps=trace.rps[:n], prompt_tokens=cut(trace.prompt_tokens), output_tokens=cut(trace.output_tokens))


def run_one(job: tuple[Path, float | None, Policy, Kind, StateRule, int]) -> RunResult:
    path, hours, policy, kind, rule, seed = job
    trace = load_trace(path)
    if hours is not None:
        trace = truncate(trace, hours)
    return Fleet(trace, policy, kind, seed=seed, rule=rule).run()


def jobs_for(paths: list[Path], hours: float | None, seed: int, ablation: bool) -> list[tuple[Path, float | None, Policy, Kind, StateRule, int]]:
    jobs = [(p, hours, policy, kind, StateRule.AGENT, seed) for p in paths for kind in Kind for policy in POLICIES]
    if ablation:
        demand = POLICIES[-1]
        jobs += [(p, hours, demand, kind, rule, seed) for p in paths for kind in Kind for rule in StateRule if rule is not StateRule.AGENT]
    return jobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the first 4 hours of each trace")
    parser.add_argument("--traces", nargs="*", type=Path, default=sorted((REPO / "bench" / "traces").glob("*.csv")))
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--plot", type=Path, help="PNG to write (default bench/fleet_sim.png; none with --quick)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--ablation", action="store_true", help="also run the demand gauge under the other lifecycle rules")
    args = parser.parse_args()
    if args.plot is None and not args.quick:
        args.plot = REPO / "bench" / "fleet_sim.png"
    args.no_plot = args.no_plot or args.plot is None
    hours = 4.0 if args.quick else None
    jobs = jobs_for(args.traces, hours, args.seed, args.ablation)
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs))
    took = time.monotonic() - started
    if not args.no_plot:
        plot(results, args.plot)
    print(report(results, args, took))


def report(results: list[RunResult], args: argparse.Namespace, took_s: float) -> str:
    f = FleetParams()
    command = "python -m bench.fleet_sim" + (" --quick" if args.quick else "") + (" --ablation" if args.ablation else "") + f" --seed {args.seed}"
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"
    lines = [
        f"### Fleet autoscaling: which signal to scale on ({len(results)} runs, {took_s:.0f} s on {args.jobs} processes)",
        "",
        f"`{command}` — {machine}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        (
            f"Steps of {f.dt_s:g} s; model load {f.model_load_s:g} s after a {f.boot_s:g} s boot; Spot preemptions "
            f"{f.preemptions_per_node_hour:g} per node-hour with a {f.preemption_notice_s:g} s notice; TTFT SLO {f.slo_ttft_s:g} s; "
            f"min {f.min_nodes}, max {f.max_nodes} nodes. Bold: the fewest GPU-hours among the policies with >= 99 % within the SLO."
        ),
        "",
        *table(results),
        f"Plot: {args.plot.relative_to(REPO) if args.plot.is_relative_to(REPO) else args.plot}" if not args.no_plot else "",
    ]
    for kind in Kind:
        demand = [r for r in results if r.kind == kind.value and r.policy == "demand" and r.rule == "agent"]
        if demand:
            met = sum(1 for r in demand if r.slo_share >= SLO_GOAL and all(
                o.gpu_hours > r.gpu_hours for o in results if o.trace == r.trace and o.kind == r.kind and o.policy != "demand" and o.rule == "agent"))
            lines.append(summary_line(f"fleet sim ({kind.value.upper()}): demand gauge >= 99 % in SLO with the fewest GPU-hours",
                                      f"{met} of {len(demand)} traces", "every trace"))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
