"""What a simulated vLLM serves on /metrics: its counters and histograms (vLLM's own
bucket boundaries, V1 names, one engine), as the samples probes/prom_text.py would parse."""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from types import MappingProxyType

from agent.sim.vllm_buckets import E2E_BUCKETS as E2E_BUCKETS_S
from agent.sim.vllm_buckets import TPOT_BUCKETS as ITL_BUCKETS_S  # vLLM's inter-token latency
from agent.sim.vllm_buckets import TTFT_BUCKETS as TTFT_BUCKETS_S
from probes.prom_text import Sample

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_LABELS = MappingProxyType({"engine": "0", "model_name": MODEL})


def _labels(**extra: str) -> MappingProxyType[str, str]:
    return MappingProxyType({**_LABELS, **extra})


def _le(buckets: tuple[float, ...]) -> tuple[MappingProxyType[str, str], ...]:
    return (*(_labels(le=f"{b}") for b in buckets), _labels(le="+Inf"))


_STOP, _ABORT = _labels(finished_reason="stop"), _labels(finished_reason="abort")


@dataclass(slots=True)
class Histogram:
    """One of vLLM's histograms: counts per bucket (+Inf last) and the sum."""

    name: str
    buckets_s: tuple[float, ...]
    counts: list[float] = field(init=False)
    total_s: float = 0.0
    _le: tuple[MappingProxyType[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        self.counts = [0.0] * (len(self.buckets_s) + 1)
        self._le = _le(self.buckets_s)

    def observe(self, value_s: float, count: float = 1.0) -> None:
        self.counts[bisect.bisect_left(self.buckets_s, value_s)] += count
        self.total_s += value_s * count

    def samples(self) -> list[Sample]:
        out, cumulative = [], 0.0
        bucket = self.name + "_bucket"
        for le, count in zip(self._le, self.counts, strict=False):
            cumulative += count
            out.append(Sample(bucket, le, cumulative))
        out.append(Sample(self.name + "_count", _LABELS, cumulative))
        out.append(Sample(self.name + "_sum", _LABELS, self.total_s))
        return out


@dataclass(slots=True)
class Exposition:
    """The counters and histograms a node's vLLM keeps; `samples` is its /metrics."""

    num_gpu_blocks: int
    block_size: int
    prompt_tokens: float = 0.0
    preemptions: float = 0.0
    stopped: float = 0.0
    aborted: float = 0.0
    ttft: Histogram = field(default_factory=lambda: Histogram("vllm:time_to_first_token_seconds", TTFT_BUCKETS_S))
    itl: Histogram = field(default_factory=lambda: Histogram("vllm:inter_token_latency_seconds", ITL_BUCKETS_S))
    e2e: Histogram = field(default_factory=lambda: Histogram("vllm:e2e_request_latency_seconds", E2E_BUCKETS_S))

    def samples(self, running: int, waiting: int, kv_usage_ratio: float, generation_tokens: float) -> list[Sample]:
        cache = _labels(block_size=str(self.block_size), num_gpu_blocks=str(self.num_gpu_blocks), kv_cache_memory_bytes="None")
        out = [
            Sample("vllm:num_requests_running", _LABELS, float(running)),
            Sample("vllm:num_requests_waiting", _LABELS, float(waiting)),
            Sample("vllm:kv_cache_usage_perc", _LABELS, kv_usage_ratio),
            Sample("vllm:prompt_tokens_total", _LABELS, self.prompt_tokens),
            Sample("vllm:generation_tokens_total", _LABELS, generation_tokens),
            Sample("vllm:num_preemptions_total", _LABELS, self.preemptions),
            Sample("vllm:request_success_total", _STOP, self.stopped),
            Sample("vllm:request_success_total", _ABORT, self.aborted),
            Sample("vllm:cache_config_info", cache, 1.0),
        ]
        for histogram in (self.ttft, self.itl, self.e2e):
            out += histogram.samples()
        return out
