"""What one node can serve: its saturation throughput for given request sizes, measured
by running the node model flat out (used to size the fleet at the start of a run, to
check the calibration in bench/FLEET.md, and to profile the batch baseline's target)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from bench.fleet.node_model import EngineModes, NodeServer, ServingParams


@dataclass(frozen=True, slots=True)
class Saturation:
    requests_per_s: float
    output_tokens_per_s: float
    running: float  # mean batch while saturated
    kv_usage_ratio: float


@functools.lru_cache(maxsize=256)
def saturation(
    params: ServingParams, prompt_tokens: int, output_tokens: int, modes: EngineModes = EngineModes(), seconds: float = 240.0
) -> Saturation:
    """Steady state of a node whose queue never empties (fixed sizes; the first third of
    the run is warm-up and not counted)."""
    server = NodeServer(params, slo_ttft_s=1e9, modes=modes)
    dt, warmup = 1.0, seconds / 3
    t = 0.0
    done0 = tokens0 = 0.0
    batch = kv = 0.0
    samples = 0
    while t < seconds:
        backlog = params.max_num_seqs + 64 - server.in_flight
        arrivals = [(t, prompt_tokens, output_tokens, 1)] * max(0, backlog)
        server.step(t, dt, arrivals)
        t += dt
        if t == warmup:
            done0, tokens0 = server.metrics.stopped, server.generation_tokens()
        elif t > warmup:
            batch += server.running
            kv += server.kv_usage_ratio()
            samples += 1
    span = seconds - warmup
    return Saturation(
        (server.metrics.stopped - done0) / span, (server.generation_tokens() - tokens0) / span, batch / samples, kv / samples
    )


def nodes_for(rate_rps: float, sat: Saturation, load_ratio: float) -> int:
    """Nodes that serve `rate_rps` at `load_ratio` of their saturation throughput."""
    return max(1, -int(-rate_rps // (load_ratio * sat.requests_per_s)))
