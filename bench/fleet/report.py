"""The study's tables (markdown: per trace, the verdict, the sensitivity to each
perturbation) and its plot (PNG; matplotlib is a bench-only dependency, imported by
`plot` alone)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.fleet.sim import RunResult

SLO_GOAL = 0.99
GAUGE = "demand"


def _pct(share: float) -> str:
    return f"{share * 100:.2f} %"


def _cell(r: RunResult | None) -> str:
    return "-" if r is None else f"{r.gpu_hours:.1f} h, {_pct(r.slo_share)}"


def _main(results: Sequence[RunResult]) -> list[RunResult]:
    return [r for r in results if r.rule == "agent" and r.fidelity == "realistic"]


def winner(runs: Sequence[RunResult]) -> RunResult | None:
    """The cheapest run with >= 99 % within the SLO (None: no policy reaches it); the
    demand gauge wins a tie (within 0.5 % of the GPU-hours: the same fleet)."""
    passing = [r for r in runs if r.slo_share >= SLO_GOAL]
    if not passing:
        return None
    best = min(passing, key=lambda r: r.gpu_hours)
    gauge = next((r for r in passing if r.policy == GAUGE), None)
    return gauge if gauge is not None and gauge.gpu_hours <= best.gpu_hours * 1.005 else best


def _row(r: RunResult, best: bool) -> str:
    gpu = f"**{r.gpu_hours:.1f}**" if best else f"{r.gpu_hours:.1f}"
    lost = f"{r.lost_preemption:.0f} ({r.preemptions} preemptions)"
    policy = r.policy if r.rule == "agent" else f"{r.policy} [{r.rule}]"
    return (
        f"| {r.kind.upper()} | {policy} | {gpu} | {_pct(r.slo_share)} | {lost} | {r.rejected + r.lost_drain:.0f} | "
        f"{r.kv_preemptions:.0f} | {r.scale_events} ({r.scale_ups} up, {r.scale_downs} down) | {r.peak_nodes} |"
    )


def table(results: Sequence[RunResult]) -> list[str]:
    """One table per trace, every policy on both autoscalers; bold: the winner."""
    lines: list[str] = []
    main = [r for r in results if r.fidelity == "realistic"]
    for trace in dict.fromkeys(r.trace for r in main):
        runs = [r for r in main if r.trace == trace]
        lines += [
            f"#### {trace} ({runs[0].arrived:,.0f} requests)",
            "",
            "| autoscaler | policy | GPU-hours | within TTFT SLO | lost to preemption | rejected or lost in a drain "
            "| vLLM KV preemptions | scale events | peak nodes |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for kind in dict.fromkeys(r.kind for r in runs):
            same = [r for r in runs if r.kind == kind]
            best = winner([r for r in same if r.rule == "agent"])
            lines += [_row(r, r is best) for r in same]
        lines.append("")
    return lines


def verdict_table(results: Sequence[RunResult]) -> list[str]:
    """Per trace and autoscaler: who wins, and whether the demand gauge met the goal."""
    lines = [
        "| trace | autoscaler | cheapest policy at >= 99 % | its GPU-hours, within SLO | demand gauge | goal met |",
        "|---|---|---|---|---|---|",
    ]
    main = _main(results)
    for trace in dict.fromkeys(r.trace for r in main):
        for kind in dict.fromkeys(r.kind for r in main if r.trace == trace):
            runs = [r for r in main if r.trace == trace and r.kind == kind]
            best, gauge = winner(runs), next((r for r in runs if r.policy == GAUGE), None)
            met = gauge is not None and best is gauge
            why = "yes" if met else ("no policy reaches 99 %" if best is None else "no")
            lines.append(
                f"| {trace} | {kind.upper()} | {best.policy if best else 'none'} | {_cell(best)} | {_cell(gauge)} | {why} |"
            )
    return lines


def goal_count(results: Sequence[RunResult], kind: str) -> tuple[int, int]:
    """(traces where the gauge is the cheapest policy at >= 99 %, traces run) for `kind`."""
    main = [r for r in _main(results) if r.kind == kind]
    traces = list(dict.fromkeys(r.trace for r in main))
    met = 0
    for trace in traces:
        runs = [r for r in main if r.trace == trace]
        best = winner(runs)
        met += best is not None and best.policy == GAUGE
    return met, len(traces)


def sensitivity_table(results: Sequence[RunResult], columns: Sequence[str]) -> list[str]:
    """Rows: policy x autoscaler; columns: realistic, then each knob set back to ideal."""
    runs = [r for r in results if r.rule == "agent" and r.fidelity in columns]
    if not any(r.fidelity != columns[0] for r in runs):
        return []
    trace = runs[0].trace
    lines = [
        f"GPU-hours and share within the TTFT SLO on {trace}; each column sets one perturbation back to its ideal "
        "value (the others stay realistic); '=' where a knob does not apply to that autoscaler.",
        "",
        "| autoscaler | policy | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for kind in dict.fromkeys(r.kind for r in runs):
        for policy in dict.fromkeys(r.policy for r in runs if r.kind == kind):
            cells = []
            for column in columns:
                r = next(
                    (x for x in runs if x.kind == kind and x.policy == policy and x.fidelity == column and x.trace == trace), None
                )
                cells.append("=" if r is None else _cell(r))
            lines.append(f"| {kind.upper()} | {policy} | " + " | ".join(cells) + " |")
    return lines


def plot(results: Sequence[RunResult], path: Path, traces: Sequence[str]) -> None:
    """Nodes and SLO attainment over time, per policy, on each trace, both autoscalers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    main = _main(results)
    traces = [t for t in traces if any(r.trace == t for r in main)]
    kinds = list(dict.fromkeys(r.kind for r in main))
    if not traces:
        return
    fig, axes = plt.subplots(2 * len(traces), len(kinds), figsize=(7.0 * len(kinds), 3.4 * 2 * len(traces)), squeeze=False)
    for i, trace in enumerate(traces):
        for j, kind in enumerate(kinds):
            _panel(
                axes[2 * i][j],
                axes[2 * i + 1][j],
                [r for r in main if r.trace == trace and r.kind == kind],
                f"{trace} - {kind.upper()}",
            )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


_COLORS = {
    "gpu80": "tab:red",
    "queue": "tab:orange",
    "ttft1.5s": "tab:purple",
    "kv0.5": "tab:blue",
    "batch64": "tab:brown",
    "demand": "tab:green",
}


def _panel(nodes_ax, slo_ax, runs: Sequence[RunResult], title: str) -> None:
    if not runs:
        return
    rate = nodes_ax.twinx()
    rate.fill_between([row[0] / 3600 for row in runs[0].timeline], [row[1] for row in runs[0].timeline], color="0.88", step="pre")
    rate.set_ylabel("requests/s", color="0.5")
    nodes_ax.set_zorder(rate.get_zorder() + 1)
    nodes_ax.patch.set_visible(False)
    for r in runs:
        xs = [row[0] / 3600 for row in r.timeline]
        label = f"{r.policy} ({r.gpu_hours:.0f} GPU-h, {r.slo_share * 100:.1f} %)"
        nodes_ax.step(xs, [row[2] for row in r.timeline], where="pre", color=_COLORS.get(r.policy), label=label, linewidth=1.1)
        slo_ax.step(xs, [row[4] * 100 for row in r.timeline], where="pre", color=_COLORS.get(r.policy), linewidth=0.9)
    nodes_ax.set_title(f"{title}: GPU nodes billed", fontsize=10)
    nodes_ax.set_ylabel("GPU nodes")
    nodes_ax.legend(fontsize=7, loc="upper left")
    slo_ax.axhline(SLO_GOAL * 100, color="0.4", linestyle=":", linewidth=0.8)
    slo_ax.set_ylim(0, 101)
    slo_ax.set_title(f"{title}: share of each minute's requests within the TTFT SLO", fontsize=9)
    slo_ax.set_ylabel("%")
    slo_ax.set_xlabel("hour of the trace")
