"""The families a vLLM 0.12 V1 server serves per engine that FakeVllm leaves out (names,
labels and bucket boundaries from vllm/v1/metrics/loggers.py): `FullV1Vllm` serves
them too, so a 4-engine /metrics is the real ~1,500 lines (FakeVllm alone: ~600)."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from agent.sim.vllm import E2E_BUCKETS, FakeVllm

_TOKENS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000]
EXTRA_HISTOGRAMS = {
    "vllm:iteration_tokens_total": [1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384],
    "vllm:request_prompt_tokens": _TOKENS,
    "vllm:request_generation_tokens": _TOKENS,
    "vllm:request_max_num_generation_tokens": _TOKENS,
    "vllm:request_params_n": [1, 2, 5, 10, 20],
    "vllm:request_params_max_tokens": _TOKENS,
    "vllm:request_queue_time_seconds": list(E2E_BUCKETS),
    "vllm:request_inference_time_seconds": list(E2E_BUCKETS),
    "vllm:request_prefill_time_seconds": list(E2E_BUCKETS),
    "vllm:request_decode_time_seconds": list(E2E_BUCKETS),
}
EXTRA_COUNTERS = [
    "vllm:num_preemptions",
    "vllm:prefix_cache_queries",
    "vllm:prefix_cache_hits",
    "vllm:external_prefix_cache_queries",
    "vllm:external_prefix_cache_hits",
    "vllm:mm_cache_queries",
    "vllm:mm_cache_hits",
]


class FullV1Vllm(FakeVllm):
    """FakeVllm plus the other V1 families, rendered live by prometheus_client at every
    scrape (as vLLM does), each moving a little between scrapes."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._extra = CollectorRegistry()
        labels = ["model_name", "engine"]
        self._hists = [Histogram(n, "h", labels, buckets=b, registry=self._extra) for n, b in EXTRA_HISTOGRAMS.items()]
        self._counters = [Counter(n, "c", labels, registry=self._extra) for n in EXTRA_COUNTERS]
        self._rng = random.Random(2)

    def render_metrics(self) -> bytes:
        for engine in range(self.engines):
            for hist in self._hists:
                hist.labels(self.model, str(engine)).observe(self._rng.expovariate(1 / 50))
            for counter in self._counters:
                counter.labels(self.model, str(engine)).inc(self._rng.randint(0, 20))
        return super().render_metrics() + generate_latest(self._extra)
