"""The markdown section and summary rows of bench/bench_faults.py: one table per
fault family, each figure next to its same-run baseline and the issue's goal."""

from __future__ import annotations

from typing import Any

from bench.bench_preemption import PRELUDE
from bench.common import percentile, summary_line
from bench.fault_harness import READYZ_RATE_PER_S, AttackRun, memory_max_bytes
from bench.loadgen import LoadResult

CLIENT_GOAL_P99_MS = 50.0
SCRAPE_GOAL_P99_MS = 20.0
NOTICE_GOAL_P99_S = 2.0
_MB = 1024 * 1024  # MB here are MiB, as systemd's MemoryMax=512M means


def p99(result: LoadResult) -> str:
    return "no answers" if result.p99_ms is None else f"{result.p99_ms:.1f} ms"


def errors(result: LoadResult) -> str:
    if not result.errors:
        return "0 errors"
    kinds = ", ".join(f"{k} {n}" for k, n in result.errors_by.items() if n)
    share = f"{result.error_ratio:.1%}" if result.error_ratio < 0.1 else f"{result.error_ratio:.0%}"
    return f"**errors {share}** ({kinds})"


def mb(value: int | None) -> str:
    return "—" if value is None else f"{value / _MB:.0f} MB"


def counts(stats: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in stats.items()) or "—"


def probes(results: list[tuple[float, bool]], since: float) -> str:
    ok = sum(good for _, good in results)
    return f"{ok}/{len(results)}" + (f" ({first_failure(results, since)})" if ok < len(results) else "")


def first_failure(results: list[tuple[float, bool]], since: float) -> str:
    failed = [at for at, good in results if not good]
    return f"first failure at +{failed[0] - since:.1f} s" if failed else ""


def client_met(run: AttackRun) -> bool:
    healthy = all(good for _, good in run.healthz_during + run.healthz_after)
    fast = run.during.p99_ms is not None and run.during.p99_ms <= CLIENT_GOAL_P99_MS
    small = run.max_rss_bytes is not None and run.max_rss_bytes < memory_max_bytes() / 2
    clean = not run.during.errors and not run.after.errors and run.attack.stopped is None
    return fast and small and healthy and clean and run.alive


def client_rows(cases: list[tuple[Any, AttackRun | str]]) -> tuple[list[str], list[str]]:
    half = memory_max_bytes() / 2
    table = [
        f"| scenario | /readyz p99 quiet (baseline) | /readyz p99 during | /readyz p99 after | /healthz probes ok, during / after "
        f"| max RSS quiet / overall (goal < {half / _MB:.0f} MB) | agent fds max (limit soft:hard) | attack client said | goal met |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for case, run in cases:
        if isinstance(run, str):
            table.append(f"| {case.title} | {run} | | | | | | | no |")
            rows.append(summary_line(f"faults {case.scenario}: {case.short}", run, "bench ran"))
            continue
        met = client_met(run)
        table.append(
            f"| {case.title} | {p99(run.quiet)}, {errors(run.quiet)} | {p99(run.during)}, {errors(run.during)} "
            f"| {p99(run.after)}, {errors(run.after)} | {probes(run.healthz_during, run.attack_started)} / "
            f"{probes(run.healthz_after, run.attack_started)} | {mb(run.max_rss_quiet_bytes)} / {mb(run.max_rss_bytes)} "
            f"| {run.max_fds} ({run.nofile[0]}:{run.nofile[1]}) | set up: {counts(run.attack.ready)}; at the end: {run.attack.stopped or counts(run.attack.done)} "
            f"| {'yes' if met else '**no**'}{'' if run.alive else ' (agent exited)'} |"
        )
        dead = first_failure(run.healthz_during, run.attack_started)
        rows.append(
            summary_line(
                f"faults {case.scenario}: /readyz p99 during {case.short} (quiet: {p99(run.quiet)})",
                f"{p99(run.during)}, {errors(run.during).replace('**', '')}; RSS max {mb(run.max_rss_bytes)}"
                + (f"; /healthz {dead}" if dead else "")
                + (f"; {run.attack.stopped.split(':')[0]}" if run.attack.stopped else ""),
                f"<= {CLIENT_GOAL_P99_MS:g} ms, 0 errors, RSS < {half / _MB:.0f} MB",
            )
        )
    return table, rows


def scrape_rows(runs: list[Any]) -> tuple[list[str], list[str]]:
    table = [
        "| vLLM /metrics | body | /readyz p50 / p99 | /readyz errors | agent's own /metrics after (lines, bytes, s to fetch) | max RSS | goal met (p99 <= 20 ms) |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = []
    baseline = runs[0] if runs and not isinstance(runs[0], str) else None
    for run in runs:
        if isinstance(run, str):
            table.append(f"| ? | {run} | | | | | no |")
            continue
        lines = "no answer in 30 s" if run.own_metrics is None else f"{run.own_metrics[0]:,} lines"
        own = lines if run.own_metrics is None else f"{lines}, {mb(run.own_metrics[1])}, {run.own_metrics[2]:.2f} s"
        r = run.readyz
        met = r.p99_ms is not None and r.p99_ms <= SCRAPE_GOAL_P99_MS and not r.errors
        p50 = "—" if r.p50_ms is None else f"{r.p50_ms:.1f} ms"
        over = run.max_rss_bytes is not None and run.max_rss_bytes > memory_max_bytes()
        rss = mb(run.max_rss_bytes) + (" (**over MemoryMax**: the unit would OOM-kill it)" if over else "")
        table.append(
            f"| {run.what} | {run.body_bytes / _MB:.1f} MB | {p50} / {p99(r)} | {errors(r)} | {own} | {rss} | {'yes' if met else '**no**'}{'' if run.alive else ' (agent exited)'} |"
        )
        if run is not baseline and baseline is not None:
            rows.append(
                summary_line(
                    f"faults d: /readyz p99 while vLLM serves {run.what.lstrip('+ ')} (baseline: {p99(baseline.readyz)})",
                    f"{p99(r)}; agent /metrics {lines}" + ("; RSS over MemoryMax" if over else ""),
                    f"<= {SCRAPE_GOAL_P99_MS:g} ms; agent /metrics lines fixed",
                )
            )
    return table, rows


def seconds(value_s: float) -> str:
    return f"{value_s * 1000:.1f} ms" if value_s < 1 else f"{value_s:.2f} s"


def notice_stats(values: list[float | None], limit_s: float) -> tuple[str, str, str, int]:
    """p50, p99, max (text) and how many were not seen within the limit (counted as the limit)."""
    seen = [v if v is not None else limit_s for v in values]
    missed = sum(v is None for v in values)
    if not missed:
        return seconds(percentile(seen, 0.5)), seconds(percentile(seen, 0.99)), seconds(max(seen)), 0
    at_least = f">= {seconds(percentile(seen, 0.99))} ({missed} not seen within {limit_s:g} s)"
    return seconds(percentile(seen, 0.5)), at_least, f"> {limit_s:g} s", missed


def notice_rows(notices: dict[str, Any], plan: Any) -> tuple[list[str], list[str]]:
    table = ["| path | trials | p50 | p99 | max | goal met (p99 <= 2 s) |", "|---|---|---|---|---|---|"]
    titles = {
        "clean": "clean: the hanging GET in place, then TRUE",
        "prelude": f"after 5 bad answers ({', '.join(PRELUDE)}), TRUE {plan.notice_gap_s:g} s after the last",
    }
    stats: dict[str, tuple[str, str, str, int]] = {}
    for key, title in titles.items():
        values = notices.get(key)
        if isinstance(values, str) or not values:
            table.append(f"| {title} | — | {values} | | | no |")
            continue
        stats[key] = notice_stats(values, plan.notice_limit_s)
        met = not stats[key][3] and percentile([v for v in values if v is not None], 0.99) <= NOTICE_GOAL_P99_S
        table.append(
            f"| {title} | {len(values)} | {stats[key][0]} | {stats[key][1]} | {stats[key][2]} | {'yes' if met else '**no**'} |"
        )
    rows = []
    if "prelude" in stats:
        clean = stats["clean"][1] if "clean" in stats else "—"
        rows.append(
            summary_line(
                f"faults e: preemption notice -> first 503 after 5 bad metadata answers, p99 of {plan.trials} (clean path p99 {clean})",
                stats["prelude"][1],
                f"<= {NOTICE_GOAL_P99_S:g} s",
            )
        )
    return table, rows


CLIENTS_NOTE = (
    "Quiet: the agent alone; during: the attack client's connections are set up, then /readyz and /healthz are measured "
    "for the attack's length less 1 s; after: once the attack client has closed everything and exited. The agent's fd "
    "limit is set before it starts (RLIMIT_NOFILE soft:hard, read back from /proc/<pid>/limits). Past the unit's "
    "MemoryMax the bench stops the attack (systemd would OOM-kill the agent there)."
)
SCRAPES_NOTE = (
    "A fresh agent READY on the plain exposition; 1 s into the /readyz window its FakeVllm (own process, pre-rendered "
    "bodies) starts serving the big one, so the window holds the agent's first scrapes of the new series and the steady "
    'state after. Extra lines are `vllm:request_success_total{engine="0",finished_reason="r<N>",model_name="m"} 1.0` '
    "(a short model name keeps 100k lines under the agent's 8 MiB scrape cap, so they are parsed, not refused). "
    "The agent's own /metrics is fetched after the window."
)
NOTICES_NOTE = (
    "A fresh agent per trial, READY with its hanging GET on instance/preempted in place. Clean: TRUE is set. After bad "
    "answers: the value turns to garbage (which ends the hanging GET: the first bad answer), the next four requests on the "
    "path get injected faults, then TRUE is set a fixed time after the last. Time is to the first 503 of /readyz polled "
    "back to back."
)


def render(results: dict[str, Any], plan: Any, command: str, header: str) -> str:
    lines = [
        "### Faults: /readyz, /healthz and memory when clients, vLLM and the metadata server misbehave (issue 13)",
        "",
        f"`{command}` — {header}",
        "",
        f"/readyz is measured by bench/loadgen.c at {READYZ_RATE_PER_S} req/s (open loop, latency from each request's due time, "
        "4 keep-alive connections opened after the attack is set up, 5 s timeout); /healthz is probed like the kubelet "
        "(a new connection every 0.5 s, 1 s timeout). The agent scrapes a FakeVllm (its own process) every 1 s. "
        "Each agent is fresh; the quiet baseline is the same agent just before the attack. Attack clients run in their own process, "
        "on loopback, and stop by themselves. Absolute times are this shared 2-core machine's.",
    ]
    rows: list[str] = []
    sections = [
        ("clients", "#### a-c. Misbehaving clients", CLIENTS_NOTE, client_rows),
        ("scrapes", "#### d. vLLM serving huge /metrics", SCRAPES_NOTE, scrape_rows),
        (
            "notices",
            "#### e. Preemption notice -> first /readyz 503, after bad metadata answers",
            NOTICES_NOTE,
            lambda v: notice_rows(v, plan),
        ),
    ]
    for key, heading, note, build in sections:
        if key in results:
            table, summary = build(results[key])
            lines += ["", heading, "", note, "", *table]
            rows += summary
    return "\n".join([*lines, "", *rows])
