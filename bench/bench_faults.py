"""Issue 13's fault section: /readyz p99 (C open-loop driver, 200 req/s) and the
agent's RSS while clients misbehave (a slowloris, idle keep-alive connections under
two fd limits, 1 MB headers), while vLLM serves huge /metrics, and the time from a
preemption notice to the first /readyz 503 after bad metadata answers, each next
to its quiet or clean baseline measured in the same run.

    python -m bench.bench_faults [--quick] [--only a,b,c,d,e] [--headers-seconds 120] [--trials 20]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Any

import aiohttp

from bench import bench_preemption, fault_report
from bench.common import Child, agent_under_test, machine_header, start_child
from bench.fault_harness import READYZ_RATE_PER_S, AttackRun, under_attack, unit_nofile
from bench.loadgen import drive

SCENARIOS = "abcde"
EXPOSITIONS = [  # (what, bench.vllm_child arguments); the first is the quiet baseline
    ("the real 1-engine exposition (baseline)", []),
    ("+ 10,000 distinct-label lines", ["--extra-lines", "10000"]),
    ("+ 30,000 distinct-label lines", ["--extra-lines", "30000"]),
    ("+ 100,000 distinct-label lines", ["--extra-lines", "100000"]),
    ("+ one 7 MB line (a 7 MB label value)", ["--long-line-bytes", "7000000"]),
]
HEADER_SHAPES = [  # scenario c: how the 1 MB of headers is sent (bench/attackers.py --shape)
    ("line", "one 1 MB header line", "one 1 MB header line per request"),
    (
        "fields",
        "1 MB in 8,000-byte fields",
        "1 MB of headers per request in 8,000-byte fields (each under aiohttp's 8,190-byte limit)",
    ),
    ("endless", "a never-ending header block", "a header block that never ends (1 MB of 8,000-byte fields after another)"),
]
PAD_AFTER_S = 1.0  # into the /readyz window, the FakeVllm starts serving the big exposition
PADDED_MODEL = "m"  # short series, so 100k lines (8.3 MB) stay under the agent's 8 MiB scrape cap and are parsed


@dataclass(frozen=True, slots=True)
class Plan:
    quiet_s: float
    attack_s: float
    headers_s: float
    after_s: float
    scrape_s: float
    trials: int
    slowloris_interval_s: float = 3.0
    notice_gap_s: float = 0.5
    notice_limit_s: float = 45.0


FULL = Plan(quiet_s=10, attack_s=30, headers_s=120, after_s=5, scrape_s=15, trials=20)
QUICK = Plan(quiet_s=3, attack_s=8, headers_s=10, after_s=3, scrape_s=5, trials=5)


@dataclass
class ScrapeRun:
    """One vLLM exposition: its size, /readyz while the agent scrapes it, the agent's own /metrics."""

    what: str
    body_bytes: int
    readyz: Any  # LoadResult
    own_metrics: tuple[int, int, float] | None  # (lines, bytes, seconds to fetch), None: no answer
    max_rss_bytes: int | None
    alive: bool


@dataclass(frozen=True, slots=True)
class ClientCase:
    """One misbehaving-client scenario: `bench.attackers KIND ARGS` for `seconds`."""

    scenario: str  # a, b or c
    short: str  # for the summary row
    title: str
    kind: str
    args: tuple[str, ...]
    seconds: float
    nofile: tuple[int, int] | None = None  # the agent's RLIMIT_NOFILE (soft, hard); None: this shell's


def client_cases(plan: Plan) -> list[ClientCase]:
    soft, hard, note = unit_nofile()
    idle = ("--connections", "2500")
    every = f"{plan.slowloris_interval_s:g}"
    cases = [
        ClientCase(
            "a",
            "a slowloris of 800 connections",
            f"a. slowloris: 800 connections, one header byte each every {every} s",
            "slowloris",
            ("--connections", "800", "--interval-s", every),
            plan.attack_s,
        ),
        ClientCase(
            "b",
            "2,500 idle connections, fd limit 1024",
            "b. 2,500 idle keep-alive connections, agent under RLIMIT_NOFILE 1024:1024 (systemd's default soft limit)",
            "idle",
            idle,
            plan.attack_s,
            (1024, 1024),
        ),
        ClientCase(
            "b",
            f"2,500 idle connections, the unit's fd limit ({soft})",
            f"b. 2,500 idle keep-alive connections, agent under the unit's limit {soft}:{hard} ({note})",
            "idle",
            idle,
            plan.attack_s,
            (soft, hard),
        ),
    ]
    for shape, short, what in HEADER_SHAPES:
        cases.append(
            ClientCase(
                "c",
                f"8 clients x {short}, {plan.headers_s:g} s",
                f"c. 8 clients sending {what}, back to back, for {plan.headers_s:g} s",
                "headers",
                ("--connections", "8", "--header-bytes", "1000000", "--shape", shape),
                plan.headers_s,
            )
        )
    return cases


async def clients(plan: Plan, only: str) -> list[tuple[ClientCase, AttackRun | str]]:
    """Scenarios a-c, each on a fresh agent scraping one shared 1-engine FakeVllm."""
    vllm = await start_child("bench.vllm_child", "--engines", "1")
    try:
        return [
            (case, await guarded(lambda case=case: one_attack(vllm, case, plan)))
            for case in client_cases(plan)
            if case.scenario in only
        ]
    finally:
        vllm.stop()


async def one_attack(vllm: Child, case: ClientCase, plan: Plan) -> AttackRun:
    async with agent_under_test(vllm.url, case.nofile) as subject:
        return await under_attack(subject, case.kind, plan.quiet_s, case.seconds, plan.after_s, *case.args)


async def scrapes(plan: Plan) -> list[ScrapeRun | str]:
    """Scenario d: a fresh agent per exposition, each FakeVllm in its own process."""
    return [await guarded(lambda what=what, args=args: one_scrape(what, args, plan)) for what, args in EXPOSITIONS]


async def one_scrape(what: str, args: list[str], plan: Plan) -> ScrapeRun:
    vllm = await start_child("bench.vllm_child", "--model", PADDED_MODEL, *args)
    try:
        async with agent_under_test(vllm.url) as subject:
            measuring = asyncio.ensure_future(drive(subject.readyz, READYZ_RATE_PER_S, plan.scrape_s, connections=4))
            await asyncio.sleep(PAD_AFTER_S)
            vllm.proc.send_signal(signal.SIGUSR1)  # the big series appear: first scrapes of them inside the window
            readyz = await measuring
            own = await own_metrics(f"{subject.agent.url}/metrics")
            return ScrapeRun(what, int(vllm.fields[0]), readyz, own, subject.sampler.max_rss_bytes(), subject.alive())
    finally:
        vllm.stop()


async def own_metrics(url: str, timeout_s: float = 30.0) -> tuple[int, int, float] | None:
    """The agent's /metrics, fetched after the /readyz window (rendering it can stall the loop)."""
    started = time.monotonic()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as session, session.get(url) as resp:
            body = await resp.read()
    except (aiohttp.ClientError, TimeoutError):
        return None
    return body.count(b"\n"), len(body), time.monotonic() - started


async def notices(plan: Plan) -> dict[str, list[float | None] | str]:
    """Scenario e: the clean path (bench_preemption's trials), then after a prelude of bad answers."""

    async def clean() -> list[float | None]:
        agent_s, _polled_s = await bench_preemption.run(plan.trials)
        return list(agent_s)

    async def prelude() -> list[float | None]:
        return await bench_preemption.run_prelude(plan.trials, bench_preemption.PRELUDE, plan.notice_gap_s, plan.notice_limit_s)

    return {"clean": await guarded(clean), "prelude": await guarded(prelude)}


async def guarded(step: Callable[[], Awaitable[Any]]) -> Any:
    """A scenario that breaks the bench is reported as such, never ends the run."""
    try:
        return await step()
    except Exception as exc:
        traceback.print_exc()
        return f"bench error: {type(exc).__name__}: {str(exc)[:200]}"


async def run(plan: Plan, only: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    if set(only) & set("abc"):
        results["clients"] = await clients(plan, only)
    if "d" in only:
        results["scrapes"] = await scrapes(plan)
    if "e" in only:
        results["notices"] = await notices(plan)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short runs (seconds, not minutes)")
    parser.add_argument("--only", default=SCENARIOS, help="scenarios to run, e.g. a,c,e")
    parser.add_argument("--headers-seconds", type=float, help="scenario c's length (full 120, quick 10)")
    parser.add_argument("--trials", type=int, help="scenario e's trials per path (full 20, quick 5)")
    args = parser.parse_args()
    plan = QUICK if args.quick else FULL
    plan = replace(plan, headers_s=args.headers_seconds or plan.headers_s, trials=args.trials or plan.trials)
    only = "".join(c for c in args.only if c in SCENARIOS)
    results = asyncio.run(run(plan, only))
    print(fault_report.render(results, plan, command(args), machine_header()))


def command(args: argparse.Namespace) -> str:
    parts = ["python -m bench.bench_faults"] + (["--quick"] if args.quick else [])
    parts += [f"--only {args.only}"] if args.only != SCENARIOS else []
    parts += [f"--headers-seconds {args.headers_seconds:g}"] if args.headers_seconds else []
    parts += [f"--trials {args.trials}"] if args.trials else []
    return " ".join(parts)


if __name__ == "__main__":
    main()
