"""The comparison's table (markdown, with the verdict per trace) and its plot (PNG).

matplotlib is a bench-only dependency, imported by `plot` alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.fleet.sim import RunResult

SLO_GOAL = 0.99


def _row(r: RunResult, best: bool) -> str:
    gpu = f"**{r.gpu_hours:.1f}**" if best else f"{r.gpu_hours:.1f}"
    slo = f"{r.slo_share * 100:.2f} %"
    lost = f"{r.lost_preemption:.0f} ({r.preemptions} preemptions)"
    policy = r.policy if r.rule == "agent" else f"{r.policy} [{r.rule}]"
    return (
        f"| {r.kind.upper()} | {policy} | {gpu} | {slo} | {lost} | {r.rejected + r.lost_drain:.0f} | "
        f"{r.scale_events} ({r.scale_ups} up, {r.scale_downs} down) | {r.peak_nodes} |"
    )


def verdict(results: Sequence[RunResult], kind: str) -> str:
    """Does the demand gauge keep >= 99 % within the SLO with the fewest GPU-hours?"""
    runs = [r for r in results if r.kind == kind and r.rule == "agent"]
    demand = next((r for r in runs if r.policy == "demand"), None)
    if demand is None:
        return ""
    others = [r for r in runs if r.policy != "demand"]
    cheaper = [r for r in others if r.gpu_hours <= demand.gpu_hours]
    meets = demand.slo_share >= SLO_GOAL
    head = f"{kind.upper()}: demand {demand.slo_share * 100:.2f} % within SLO, {demand.gpu_hours:.1f} GPU-h"
    if meets and not cheaper:
        return f"{head}: goal met (>= 99 % and fewer GPU-hours than every other policy)."
    why = []
    if not meets:
        why.append("below 99 % within the SLO")
    for r in cheaper:
        why.append(f"{r.policy} is cheaper ({r.gpu_hours:.1f} GPU-h, {r.slo_share * 100:.2f} % within SLO)")
    return f"{head}: goal NOT met: " + "; ".join(why) + "."


def table(results: Sequence[RunResult]) -> list[str]:
    lines: list[str] = []
    for trace in dict.fromkeys(r.trace for r in results):
        runs = [r for r in results if r.trace == trace]
        lines += [
            f"#### {trace} ({runs[0].arrived:,.0f} requests)",
            "",
            "| autoscaler | policy | GPU-hours | within TTFT SLO | lost to preemption | rejected or lost in a drain | scale events | peak nodes |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for kind in dict.fromkeys(r.kind for r in runs):
            same = [r for r in runs if r.kind == kind]
            passing = [r for r in same if r.slo_share >= SLO_GOAL and r.rule == "agent"]
            best = min(passing, key=lambda r: r.gpu_hours) if passing else None
            lines += [_row(r, r is best) for r in same]
        lines += [""] + [f"- {v}" for kind in dict.fromkeys(r.kind for r in runs) if (v := verdict(runs, kind))] + [""]
    return lines


def plot(results: Sequence[RunResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    traces = list(dict.fromkeys(r.trace for r in results))
    kinds = list(dict.fromkeys(r.kind for r in results))
    fig, axes = plt.subplots(len(traces), len(kinds), figsize=(6.5 * len(kinds), 3.2 * len(traces)), squeeze=False, sharex=True)
    colors = {"gpu80": "tab:red", "queue10": "tab:orange", "ttft2s": "tab:purple", "demand": "tab:green"}
    for i, trace in enumerate(traces):
        for j, kind in enumerate(kinds):
            ax = axes[i][j]
            runs = [r for r in results if r.trace == trace and r.kind == kind and r.rule == "agent"]
            if not runs:
                continue
            rate = ax.twinx()
            hours = [t / 3600 for t, *_ in runs[0].timeline]
            rate.fill_between(hours, [rps for _, rps, *_ in runs[0].timeline], color="0.85", step="post")
            rate.set_ylabel("requests/s", color="0.5")
            ax.set_zorder(rate.get_zorder() + 1)
            ax.patch.set_visible(False)
            for r in runs:
                label = f"{r.policy} ({r.gpu_hours:.0f} GPU-h, {r.slo_share * 100:.1f} %)"
                ax.step([t / 3600 for t, *_ in r.timeline], [n for _, _, n, _ in r.timeline], where="post",
                        color=colors.get(r.policy), label=label, linewidth=1.2)
            ax.set_title(f"{trace} — {kind.upper()}", fontsize=10)
            ax.set_ylabel("GPU nodes")
            ax.legend(fontsize=7, loc="upper left")
            if i == len(traces) - 1:
                ax.set_xlabel("hour of the trace")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
