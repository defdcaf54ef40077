"""Which signal to scale a vLLM fleet on: a trace-driven simulation of the fleet under
the MIG autoscaler and the HPA, each node running the agent's own metric code.

    python -m bench.fleet_sim [--quick] [--jobs 2] [--seed 1] [--azure DIR] [--traces CSV ...]
                              [--no-sensitivity] [--ablation] [--plot PATH | --no-plot]
                              [--write PATH] [fidelity flags: --prefill-cost off, --hpa-delay-s 300, ...]

Runs every policy of bench/fleet/policies.py on every trace (the sample rate traces in
bench/traces, and the Azure LLM inference trace 2023 as conv, code and mixed, read
from --azure, default ../shared/traces/azure-llm-2023 beside the repository) under both
autoscalers with every perturbation of bench/fleet/fidelity.py at its realistic
setting; then, on the mixed Azure trace, each perturbation set back to ideal one at a
time (the sensitivity table). Prints a markdown section (tables, verdicts, summary rows
for bench/run_all.py) and writes the plot. Method and parameters: bench/FLEET.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import fields, replace
from pathlib import Path

from bench.common import summary_line
from bench.fleet.agent_view import StateRule
from bench.fleet.cluster import Kind
from bench.fleet.fidelity import HARSH, KNOBS, REALISTIC, Fidelity, with_ideal
from bench.fleet.policies import DEMAND, POLICIES
from bench.fleet.report import goal_count, plot, sensitivity_table, table, verdict_table
from bench.fleet.sim import Fleet, RunResult
from bench.fleet.study import TraceSpec, azure_specs, rate_specs, stream_for

REPO = Path(__file__).resolve().parent.parent
DEFAULT_AZURE = REPO.parent / "shared" / "traces" / "azure-llm-2023"
SENSITIVITY_TRACE, SENSITIVITY_HOURS = "azure_conv", 1.0  # the trace's own hour: every policy can reach 99 % there
PLOT_TRACES = ("azure_conv", "azure_mixed")
# Knobs that only act on one autoscaler: the other's column would repeat the realistic run.
HPA_ONLY = {"GKE boots like a MIG VM", "no scale-down delay", "HPA delay 300 s"}

Job = tuple[TraceSpec, float | None, str, str, Fidelity, str, int, str]


def run_one(job: Job) -> RunResult:
    spec, hours, policy_name, kind, fidelity, label, seed, rule = job
    policy = next(p for p in POLICIES if p.name == policy_name)
    stream = stream_for(spec, fidelity, seed, hours)
    result = Fleet(stream, policy, Kind(kind), seed=seed, fidelity=fidelity, rule=StateRule(rule), label=label).run()
    if label != "realistic":  # a sensitivity run: its own (shorter) trace in the tables
        result.trace = sensitivity_name()
    return result


def sensitivity_name() -> str:
    return f"{SENSITIVITY_TRACE}, first {SENSITIVITY_HOURS:g} h"


def jobs_for(
    specs: list[TraceSpec], hours: float | None, seed: int, fidelity: Fidelity, sensitivity: bool, ablation: bool
) -> list[Job]:
    jobs: list[Job] = [
        (s, hours, p.name, k.value, fidelity, "realistic", seed, "agent") for s in specs for k in Kind for p in POLICIES
    ]
    target = next((s for s in specs if s.name == SENSITIVITY_TRACE), None)
    if sensitivity and target is not None:
        variants = [("all realistic", fidelity)] + [(name, with_ideal(fidelity, knobs)) for name, knobs in KNOBS]
        variants += [(name, replace(fidelity, **v)) for name, v in HARSH]
        jobs += [
            (target, SENSITIVITY_HOURS, p.name, k.value, f, name, seed, "agent")
            for name, f in variants
            for k in Kind
            for p in POLICIES
            if not (k is Kind.MIG and name in HPA_ONLY)
        ]
    if ablation:
        jobs += [
            (s, hours, DEMAND.name, k.value, fidelity, "realistic", seed, r.value)
            for s in specs
            for k in Kind
            for r in StateRule
            if r is not StateRule.AGENT
        ]
    return jobs


def _fidelity_flags(parser: argparse.ArgumentParser) -> None:
    for f in fields(Fidelity):
        default = getattr(REALISTIC, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            parser.add_argument(
                flag, choices=("on", "off"), default="on" if default else "off", help=f"default {'on' if default else 'off'}"
            )
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f"default {default}")


def _fidelity(args: argparse.Namespace) -> Fidelity:
    values = {}
    for f in fields(Fidelity):
        value = getattr(args, f.name)
        values[f.name] = (value == "on") if isinstance(getattr(REALISTIC, f.name), bool) else value
    return Fidelity(**values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="the first 30 minutes of each trace, no sensitivity runs (a smoke test)"
    )
    parser.add_argument("--traces", nargs="*", type=Path, default=sorted((REPO / "bench" / "traces").glob("*.csv")))
    parser.add_argument("--azure", type=Path, default=DEFAULT_AZURE, help="directory of AzureLLMInferenceTrace_{conv,code}.csv")
    parser.add_argument("--azure-scale", type=float, default=16.0, help="copies of every request (bench/fleet/requests.py scale)")
    parser.add_argument("--azure-tiles", type=int, default=2, help="the hour repeated end to end")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--plot", type=Path, help="PNG to write (default bench/fleet_sim.png; none with --quick)")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--no-sensitivity", action="store_true")
    parser.add_argument("--ablation", action="store_true", help="also run the demand gauge under the other lifecycle rules")
    parser.add_argument("--write", type=Path, help="also write the markdown section to this file")
    _fidelity_flags(parser)
    args = parser.parse_args()
    if args.plot is None and not args.quick:
        args.plot = REPO / "bench" / "fleet_sim.png"
    args.no_plot = args.no_plot or args.plot is None
    specs = rate_specs(args.traces) + azure_specs(args.azure, args.azure_scale, args.azure_tiles)
    hours = 0.5 if args.quick else None
    jobs = jobs_for(specs, hours, args.seed, _fidelity(args), not (args.no_sensitivity or args.quick), args.ablation)
    started = time.monotonic()
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        results = list(pool.map(run_one, jobs, chunksize=1))
    took = time.monotonic() - started
    if not args.no_plot:
        plot(results, args.plot, [t for t in PLOT_TRACES if any(r.trace == t for r in results)] or [results[0].trace])
    text = report(results, args, took, specs)
    print(text)
    if args.write:
        args.write.write_text(text + "\n")


def report(results: list[RunResult], args: argparse.Namespace, took_s: float, specs: list[TraceSpec]) -> str:
    machine = f"{platform.machine()} {os.cpu_count()} cores, Python {platform.python_version()}, {platform.system()}"
    command = (
        "python -m bench.fleet_sim"
        + (" --quick" if args.quick else "")
        + (" --ablation" if args.ablation else "")
        + f" --seed {args.seed}"
    )
    missing = "" if any(s.kind == "azure" for s in specs) else f" (Azure trace not found at {args.azure}: skipped)"
    lines = [
        f"### Fleet autoscaling: which signal to scale on ({len(results)} runs, {took_s:.0f} s on {args.jobs} processes)",
        "",
        f"`{command}` - {machine}; date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}{missing}",
        "",
        "Every perturbation at its realistic setting (bench/fleet/fidelity.py). Bold: the fewest GPU-hours among the "
        "policies with >= 99 % of requests within the 2 s TTFT SLO.",
        "",
        *verdict_table(results),
        "",
        *table(results),
    ]
    columns = ["all realistic"] + [name for name, _ in KNOBS] + [name for name, _ in HARSH]
    sensitivity = sensitivity_table([r for r in results if r.trace == sensitivity_name()], columns)
    if sensitivity:
        lines += ["#### Sensitivity to each perturbation", "", *sensitivity, ""]
    if not args.no_plot:
        lines.append(f"![nodes and SLO attainment over time]({args.plot.name})")
    for kind in Kind:
        met, total = goal_count(results, kind.value)
        if total:
            lines.append(
                summary_line(
                    f"fleet sim ({kind.value.upper()}): demand gauge >= 99 % in SLO with the fewest GPU-hours",
                    f"{met} of {total} traces",
                    "every trace",
                )
            )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
