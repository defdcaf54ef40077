"""Command-line entry points for the fakes, to try the agent by hand (README "Try it by
hand"):

    python -m agent.sim.vllm --port 8000 [--engines N] [--latency S]
    python -m agent.sim.metadata --port 8096 [--preempt-after S]

Each prints its URL, logs one line per notable event on stdout, and runs until SIGINT
or SIGTERM (the fake metadata server also preempts on SIGUSR1).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from collections.abc import Awaitable, Callable

_WATCH_S = 0.2  # how often the launcher looks at the fake for something to report


class _Log:
    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {self.name}: {text}", flush=True)


def _non_negative(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be 0 or more, not {text}")
    return value


async def _serve_until_signal(stop: Callable[[], Awaitable[None]], watch: Callable[[], Awaitable[None]],
                              extra: dict[signal.Signals, Callable[[], None]] | None = None) -> None:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    for sig, action in (extra or {}).items():
        loop.add_signal_handler(sig, action)
    try:
        while not done.is_set():
            await watch()
            try:
                async with asyncio.timeout(_WATCH_S):
                    await done.wait()
            except TimeoutError:
                pass
    finally:
        await stop()


def vllm_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.sim.vllm",
        description="a fake vLLM OpenAI server on 127.0.0.1: /health, /v1/models, /metrics, completions",
    )
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port (default 8000)")
    parser.add_argument(
        "--engines", type=int, default=1, choices=range(1, 65), metavar="N", help="data-parallel engines (default 1)"
    )
    parser.add_argument(
        "--latency",
        type=_non_negative,
        default=0.5,
        metavar="S",
        help="seconds each completion takes, so in-flight requests can be watched (default 0.5)",
    )
    args = parser.parse_args(argv)
    return asyncio.run(_vllm(args.port, args.engines, args.latency))


async def _vllm(port: int, engines: int, latency_s: float) -> int:
    from agent.sim.vllm import FakeVllm

    log = _Log("fake-vllm")
    fake = FakeVllm(engines=engines)
    fake.ttft_s = latency_s / 4
    fake.tpot_s = (latency_s - fake.ttft_s) / max(1, fake.completion_tokens - 1)
    try:
        await fake.start(port)
    except OSError as exc:
        print(f"fake-vllm: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    log(f"listening on {fake.url} ({engines} engine(s), model {fake.model}, {latency_s:g} s per completion)")
    seen = {"health": False, "in_flight": 0}

    async def watch() -> None:
        if not seen["health"] and any(r.path == "/health" for r in fake.requests):
            seen["health"] = True
            log("first /health check (the agent is polling)")
        in_flight = fake.in_flight
        if in_flight != seen["in_flight"]:
            log(f"{in_flight} request(s) in flight ({fake.arrived_total} received so far)")
            seen["in_flight"] = in_flight

    await _serve_until_signal(fake.stop, watch)
    log("stopped")
    return 0


def metadata_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m agent.sim.metadata", description="a fake GCE metadata server on 127.0.0.1 (point GCE_METADATA_HOST at it)"
    )
    parser.add_argument("--port", type=int, default=8096, help="0 picks a free port (default 8096)")
    parser.add_argument(
        "--preempt-after",
        type=_non_negative,
        metavar="S",
        help="set instance/preempted=TRUE after S seconds (kill -USR1 the process to do it at once)",
    )
    args = parser.parse_args(argv)
    return asyncio.run(_metadata(args.port, args.preempt_after))


async def _metadata(port: int, preempt_after_s: float | None) -> int:
    from agent.sim.metadata import PREEMPTED, FakeMetadataServer

    log = _Log("fake-metadata")
    fake = FakeMetadataServer()
    try:
        await fake.start(port)
    except OSError as exc:
        print(f"fake-metadata: cannot listen on 127.0.0.1:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    when = "on SIGUSR1" if preempt_after_s is None else f"in {preempt_after_s:g} s or on SIGUSR1"
    log(f"listening on {fake.url} (GCE_METADATA_HOST={fake.address}); preemption {when}")
    started = time.monotonic()
    preempt_now = asyncio.Event()
    seen = {"watching": False, "preempted": False}

    async def watch() -> None:
        if not seen["watching"] and fake.parked(PREEMPTED):
            seen["watching"] = True
            log(f"a client is watching {PREEMPTED} (hanging GET)")
        due = preempt_after_s is not None and time.monotonic() - started >= preempt_after_s
        if not seen["preempted"] and (due or preempt_now.is_set()):
            seen["preempted"] = True
            await fake.set(PREEMPTED, "TRUE")
            log(f"{PREEMPTED} = TRUE: Spot preemption notice issued")

    await _serve_until_signal(fake.stop, watch, {signal.SIGUSR1: preempt_now.set})
    log("stopped")
    return 0
