"""One node's vLLM as a fluid serving model that serves vLLM's own metrics.

Requests are fluid (fractional counts) in FIFO cohorts. Each step of `dt_s`:

1. Decode: every running sequence makes dt / TPOT(batch) tokens, with
   TPOT(batch) = tpot_base_s + tpot_per_seq_s * batch (a bigger batch shares the GPU);
   a share tokens / output_tokens of the batch finishes (exponential answer lengths).
2. Admission: the batch is capped by max_num_seqs and by the KV cache, each running
   sequence holding prompt + output / 2 tokens on average. Waiting cohorts are
   admitted in FIFO order, spread over the step: the k-th of A admissions happens at
   t0 + dt * k / A, so a queue of Q drains in Q / A steps and a request's wait is
   continuous, not rounded to steps.
3. TTFT = wait + prefill, prefill = prompt_tokens / prefill_tokens_per_s, slowed by
   (1 + prefill_batch_slowdown * batch share) as chunked prefill shares each step with
   decode. Prompt lengths vary: each cohort is split into the PROMPT_SPREAD points.

Each step's observations go into vLLM's histograms (its real bucket boundaries) and
counters, and `samples()` returns what vLLM's /metrics would serve, as the samples
probes/prom_text.py would parse from it (V1 names, one engine). The exact TTFT of
every request is also kept (the ground truth for the SLO share).

GPU utilization (NVML's share of time a kernel ran) is 100 * (1 - exp(-batch /
gpu_busy_seqs)): a vLLM engine with any sequence running launches kernels back to back.

Defaults: one GPU serving an 8B model (Llama-3.1-8B class on an H100/A100) with
~1.5k-token prompts and ~300-token answers: about 7.5 requests/s at saturation,
TPOT 12 ms alone and ~55 ms at a full batch. Change ServingParams to model yours.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from types import MappingProxyType

from probes.prom_text import Sample

# vLLM's bucket boundaries (vllm/v1/metrics/loggers.py), as its /metrics serves them.
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS_S = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
# (prompt length as a multiple of the mean, share of requests): mean 1.0.
PROMPT_SPREAD = ((0.4, 0.3), (1.0, 0.5), (1.9, 0.2))

_MODEL = "meta-llama/Llama-3.1-8B-Instruct"
_LABELS = MappingProxyType({"engine": "0", "model_name": _MODEL})


def _labels(**extra: str) -> MappingProxyType[str, str]:
    return MappingProxyType({**_LABELS, **extra})


_TTFT_LE = tuple(_labels(le=f"{b}") for b in TTFT_BUCKETS_S) + (_labels(le="+Inf"),)
_ITL_LE = tuple(_labels(le=f"{b}") for b in ITL_BUCKETS_S) + (_labels(le="+Inf"),)
_STOP, _ABORT = _labels(finished_reason="stop"), _labels(finished_reason="abort")


@dataclass(frozen=True, slots=True)
class ServingParams:
    """How one node serves; every field is a plain knob (units in the names)."""

    max_num_seqs: int = 256
    kv_capacity_tokens: float = 200_000.0
    prompt_tokens: float = 1500.0  # mean per request (a trace may override)
    output_tokens: float = 300.0  # mean per request (a trace may override)
    tpot_base_s: float = 0.010
    tpot_per_seq_s: float = 0.00012
    prefill_tokens_per_s: float = 10_000.0
    prefill_batch_slowdown: float = 2.0
    gpu_busy_seqs: float = 1.0

    def batch_cap(self, prompt_tokens: float, output_tokens: float) -> float:
        return min(float(self.max_num_seqs), self.kv_capacity_tokens / (prompt_tokens + output_tokens / 2))

    def max_rps(self) -> float:
        """Requests per second one node finishes at a full batch (mean request sizes)."""
        cap = self.batch_cap(self.prompt_tokens, self.output_tokens)
        return cap / (self.output_tokens * (self.tpot_base_s + self.tpot_per_seq_s * cap))


class NodeServer:
    """The vLLM of one node; `step` advances it, `samples` is its /metrics."""

    def __init__(self, params: ServingParams, slo_ttft_s: float) -> None:
        self.p = params
        self.slo_ttft_s = slo_ttft_s
        self.waiting: deque[list[float]] = deque()  # [arrival time, count]
        self.waiting_total = 0.0
        self.running = 0.0
        self.prompt_tokens, self.output_tokens = params.prompt_tokens, params.output_tokens
        self.prompt_total = self.generation_total = self.stop_total = self.abort_total = 0.0
        self.ttft_counts = [0.0] * (len(TTFT_BUCKETS_S) + 1)
        self.itl_counts = [0.0] * (len(ITL_BUCKETS_S) + 1)
        self.ttft_sum = self.itl_sum = 0.0
        # Ground truth, per request: first tokens within / past the SLO.
        self.first_within_slo = self.first_late = 0.0

    @property
    def in_flight(self) -> float:
        return self.running + self.waiting_total

    def kv_usage_ratio(self) -> float:
        per_seq = self.prompt_tokens + self.output_tokens / 2
        return min(1.0, self.running * per_seq / self.p.kv_capacity_tokens)

    def gpu_utilization_percent(self) -> float:
        return 100.0 * (1.0 - math.exp(-self.running / self.p.gpu_busy_seqs))

    def set_tokens(self, prompt_tokens: float, output_tokens: float) -> None:
        self.prompt_tokens, self.output_tokens = max(1.0, prompt_tokens), max(1.0, output_tokens)

    def step(self, t0_s: float, dt_s: float, arrivals: float) -> None:
        self._decode(dt_s)
        if arrivals > 0:
            self.waiting.append([t0_s + dt_s / 2, arrivals])
            self.waiting_total += arrivals
        if self.waiting:
            self._admit(t0_s, dt_s)

    def _decode(self, dt_s: float) -> None:
        running = self.running
        if running <= 0:
            return
        tpot_s = self.p.tpot_base_s + self.p.tpot_per_seq_s * running
        tokens_per_seq = min(dt_s / tpot_s, self.output_tokens)
        done = running * tokens_per_seq / self.output_tokens
        generated = running * tokens_per_seq
        self.generation_total += generated
        self.itl_counts[bisect.bisect_left(ITL_BUCKETS_S, tpot_s)] += generated
        self.itl_sum += generated * tpot_s
        self.running = running - done
        self.stop_total += done

    def _admit(self, t0_s: float, dt_s: float) -> None:
        cap = self.p.batch_cap(self.prompt_tokens, self.output_tokens)
        free = cap - self.running
        if free <= 1e-9:
            return
        prefill_s = self.prompt_tokens / self.p.prefill_tokens_per_s * (1 + self.p.prefill_batch_slowdown * self.running / cap)
        admitted = 0.0
        while self.waiting and admitted < free - 1e-9:
            cohort = self.waiting[0]
            take = min(cohort[1], free - admitted)
            admit_s = t0_s + dt_s * (admitted + take / 2) / free
            self._first_tokens(take, max(0.0, admit_s - cohort[0]), prefill_s)
            admitted += take
            cohort[1] -= take
            if cohort[1] <= 1e-9:
                self.waiting.popleft()
        self.waiting_total = max(0.0, self.waiting_total - admitted)
        self.running += admitted
        self.prompt_total += admitted * self.prompt_tokens

    def _first_tokens(self, count: float, wait_s: float, prefill_s: float) -> None:
        for factor, share in PROMPT_SPREAD:
            ttft_s = wait_s + prefill_s * factor
            n = count * share
            self.ttft_counts[bisect.bisect_left(TTFT_BUCKETS_S, ttft_s)] += n
            self.ttft_sum += n * ttft_s
            if ttft_s <= self.slo_ttft_s:
                self.first_within_slo += n
            else:
                self.first_late += n

    def abort_all(self) -> tuple[float, float]:
        """Preemption or drain deadline: (running, waiting) requests lost."""
        lost = (self.running, self.waiting_total)
        self.abort_total += self.running + self.waiting_total
        self.running = self.waiting_total = 0.0
        self.waiting.clear()
        return lost

    def samples(self) -> list[Sample]:
        """What this vLLM's /metrics serves, as parsed samples (V1 names, one engine)."""
        out = [
            Sample("vllm:num_requests_running", _LABELS, self.running),
            Sample("vllm:num_requests_waiting", _LABELS, self.waiting_total),
            Sample("vllm:kv_cache_usage_perc", _LABELS, self.kv_usage_ratio()),
            Sample("vllm:prompt_tokens_total", _LABELS, self.prompt_total),
            Sample("vllm:generation_tokens_total", _LABELS, self.generation_total),
            Sample("vllm:request_success_total", _STOP, self.stop_total),
            Sample("vllm:request_success_total", _ABORT, self.abort_total),
        ]
        for name, labels, counts, total_sum in (
            ("vllm:time_to_first_token_seconds", _TTFT_LE, self.ttft_counts, self.ttft_sum),
            ("vllm:inter_token_latency_seconds", _ITL_LE, self.itl_counts, self.itl_sum),
        ):
            cumulative = 0.0
            bucket = name + "_bucket"
            for le, count in zip(labels, counts):
                cumulative += count
                out.append(Sample(bucket, le, cumulative))
            out.append(Sample(name + "_count", _LABELS, cumulative))
            out.append(Sample(name + "_sum", _LABELS, total_sum))
        return out
