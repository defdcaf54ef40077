"""One node's vLLM engine, request by request, serving vLLM's own metrics.

Inside each fleet step the engine runs event by event (a prefill starts, a prefill ends
and its sequence joins the batch, a sequence ends), with vLLM V1's scheduler rules:

- Decode: every running sequence makes one token per iteration; an iteration takes
  tpot_base_s + tpot_per_seq_s * batch + tpot_per_kv_token_s * KV tokens held (the
  weights, per-sequence work, KV reads).
- Prefill, decodes first: waiting requests are prefilled FIFO in what the per-iteration
  token budget (`max_num_batched_tokens`) leaves after the decodes. With `prefill_cost`
  on, an iteration that carries prefill carries budget - batch prompt tokens and takes
  chunk / prefill_tokens_per_s longer, so prefill runs at chunk / iteration time and
  every decode in the batch slows down; off, prefill runs at prefill_tokens_per_s beside
  the decode (the "free prefill" of the earlier model). TTFT is the prefill's end plus
  the iteration it lands in (1.5 decode iterations) minus the arrival.
- Admission: a waiting request needs a sequence slot (`max_num_seqs`) and KV; the head of
  the queue blocks the rest (vLLM stops at the first request that does not fit).
- KV: a running sequence holds its prompt plus what it made. With `preemption` on
  (vLLM's behaviour) admission needs only the prompt's KV and, when the decodes outgrow
  the cache, the newest sequences are preempted (recompute: back to the head of the
  queue, prompt plus what they made to prefill again). Off, admission reserves prompt +
  output and the cache never overflows (an idealised scheduler).

Defaults: Llama-3.1-8B-Instruct (bf16) on one H100 80GB under vLLM V1's defaults;
bench/FLEET.md ("Calibration") checks them against published vLLM benchmark figures.
GPU utilization (NVML's share of time a kernel ran) is 100 * (1 - exp(-running)).
"""

from __future__ import annotations

import heapq
import math
from collections import deque
from dataclasses import dataclass

from bench.fleet.exposition import Exposition
from probes.prom_text import Sample

_NEVER = math.inf


@dataclass(frozen=True, slots=True)
class ServingParams:
    """How one node serves; every field is a plain knob (units in the names)."""

    max_num_seqs: int = 1024  # vLLM V1 default on GPUs with >= 70 GiB (EngineArgs.get_batch_defaults)
    max_num_batched_tokens: int = 8192  # likewise, for the OpenAI server
    kv_capacity_tokens: int = 400_000  # (0.9 x 80 GB - 16 GB weights - ~4 GB activations) / 128 KiB per token
    block_size: int = 16
    tpot_base_s: float = 0.013  # vLLM blog 2024-09-05: "1 token every 13 ms under light load"
    tpot_per_seq_s: float = 0.000019  # fitted to the published full-batch throughput (FLEET.md)
    tpot_per_kv_token_s: float = 5.6e-8  # 128 KiB of KV per token read at ~2.3 TB/s
    prefill_tokens_per_s: float = 30_000.0  # ~50 % of an H100's bf16 peak at 16 GFLOP per token
    prompt_tokens: float = 1500.0  # mean sizes where a trace gives none
    output_tokens: float = 300.0

    def decode_iteration_s(self, seqs: float, kv_tokens: float) -> float:
        return self.tpot_base_s + self.tpot_per_seq_s * seqs + self.tpot_per_kv_token_s * kv_tokens


@dataclass(frozen=True, slots=True)
class EngineModes:
    """The engine perturbations of bench/fleet/fidelity.py."""

    prefill_cost: bool = True
    preemption: bool = True


class _Run:
    """`count` identical sequences in the batch: decode from iteration g0 to `end`;
    `reserved` is what the no-preemption mode set aside for each (prompt + output)."""

    __slots__ = ("alive", "arrival_s", "count", "end", "g0", "kv_base", "reserved")

    def __init__(self, arrival_s: float, kv_base: float, g0: float, end: float, reserved: float, count: int) -> None:
        self.arrival_s, self.kv_base, self.g0, self.end, self.reserved = arrival_s, kv_base, g0, end, reserved
        self.count = count
        self.alive = True


class NodeServer:
    """The vLLM of one node; `step` advances it, `samples` is its /metrics.

    A waiting entry is [arrival_s, tokens to prefill, tokens still to emit (the prefill
    emits the first), first token already out, count]: `count` identical requests that
    arrived together move as one (1 for per-request traces; see bench/fleet/requests.py)."""

    def __init__(self, params: ServingParams, slo_ttft_s: float, modes: EngineModes | None = None) -> None:
        self.p, self.slo_ttft_s = params, slo_ttft_s
        self.modes = modes or EngineModes()
        self.waiting: deque[list] = deque()
        self.current: tuple[float, list, float] | None = None  # in prefill: (end_s, request, landing_s)
        self.n_waiting = self.n_prefill = 0
        self.g = 0.0  # decode iterations so far: the batch's clock
        self.heap: list[tuple[float, int, _Run]] = []
        self.lifo: list[_Run] = []
        self.n_dec = 0
        self.sum_kv_base = self.sum_g0 = self.kv_prefilling = 0.0
        self.reserved = 0.0
        self.generated = 0.0  # tokens of retired and preempted sequences, and first tokens
        self._seq = 0
        self.metrics = Exposition(params.kv_capacity_tokens // params.block_size, params.block_size)
        # Ground truth, per request: first tokens within / past the SLO.
        self.first_within_slo = self.first_late = 0.0

    @property
    def running(self) -> int:
        return self.n_dec + self.n_prefill

    @property
    def waiting_total(self) -> int:
        return self.n_waiting

    @property
    def in_flight(self) -> int:
        return self.n_dec + self.n_prefill + self.n_waiting

    def kv_used_tokens(self) -> float:
        return self.sum_kv_base + self.n_dec * self.g - self.sum_g0 + self.kv_prefilling

    def kv_usage_ratio(self) -> float:
        return min(1.0, self.kv_used_tokens() / self.p.kv_capacity_tokens)

    def gpu_utilization_percent(self) -> float:
        return 100.0 * (1.0 - math.exp(-self.running))

    def generation_tokens(self) -> float:
        return self.generated + self.n_dec * self.g - self.sum_g0

    # --- one step ----------------------------------------------------------------------

    def step(self, t0_s: float, dt_s: float, arrivals: list[tuple[float, int, int, int]]) -> None:
        """Serve [t0, t0 + dt); `arrivals` are (time, prompt tokens, output tokens, count), in order.

        The hot loop of the whole study (inlined on purpose: ~1.7 passes per request).
        Events are prefill starts and ends; the sequences that end meanwhile retire as
        the batch's clock passes them, waited for only when the queue's head needs
        their slot or KV. Inter-token latencies go to the histogram once per step, as
        the mean of the iterations with and without a prefill chunk."""
        waiting, heap = self.waiting, self.heap
        for a in arrivals:
            waiting.append([a[0], a[1], a[2], False, a[3]])
            self.n_waiting += a[3]
        p, costly, preemption = self.p, self.modes.prefill_cost, self.modes.preemption
        base_s, per_seq_s, per_kv_s, cap = p.tpot_base_s, p.tpot_per_seq_s, p.tpot_per_kv_token_s, p.kv_capacity_tokens
        per_prefill_s, budget = (1.0 / p.prefill_tokens_per_s if costly else 0.0), p.max_num_batched_tokens
        t, end_s = t0_s, t0_s + dt_s
        itl = [0.0, 0.0, 0.0, 0.0]  # tokens and token-seconds: iterations without, with prefill
        while True:
            n, cur, g = self.n_dec, self.current, self.g
            it_s = base_s + per_seq_s * n + per_kv_s * (self.sum_kv_base + n * g - self.sum_g0)
            if cur is not None:
                t_next = cur[0]
                it_s += (budget - n if budget - n > 1 else 1) * per_prefill_s
            elif not waiting:
                t_next = end_s
            elif self._admissible(waiting[0]):
                t_next = waiting[0][0] if waiting[0][0] > t else t
            else:
                t_next = self._next_done_s(t, it_s)  # blocked until a sequence ends
            if t_next > end_s:
                t_next = end_s
            if t_next > t:
                iterations = (t_next - t) / it_s
                if n:
                    k = 0 if cur is None else 2
                    itl[k] += n * iterations
                    itl[k + 1] += n * iterations * it_s
                self.g = g_next = g + iterations
                while heap and heap[0][0] <= g_next + 1e-9:
                    end, _, run = heapq.heappop(heap)
                    if run.alive:
                        self._retire(run, t + (end - g) * it_s)
                if preemption and self.sum_kv_base + self.n_dec * g_next - self.sum_g0 + self.kv_prefilling > cap:
                    self._preempt_overflow()
                t = t_next
            if t >= end_s:
                break
            if cur is not None:
                self._join(t)
                if waiting and waiting[0][0] <= t and self._admissible(waiting[0]):
                    self._start_prefill(t)  # the next prefill takes the same iteration
            elif waiting and waiting[0][0] <= t and self._admissible(waiting[0]):
                self._start_prefill(t)
        for k in (0, 2):
            if itl[k] > 0:
                self.metrics.itl.observe(itl[k + 1] / itl[k], itl[k])

    def _next_done_s(self, t: float, it_s: float) -> float:
        heap = self.heap
        while heap and not heap[0][2].alive:
            heapq.heappop(heap)
        return t + max(0.0, heap[0][0] - self.g) * it_s if heap else _NEVER

    def _admissible(self, req: list) -> bool:
        p = self.p
        count = req[4]
        if self.n_dec + self.n_prefill + count > p.max_num_seqs:
            return False
        if self.modes.preemption:
            return self.kv_used_tokens() + count * req[1] <= p.kv_capacity_tokens
        return self.reserved + count * (req[1] + req[2]) <= p.kv_capacity_tokens

    def _start_prefill(self, t: float) -> None:
        req = self.waiting.popleft()
        p = self.p
        t_dec = p.decode_iteration_s(self.n_dec, self.sum_kv_base + self.n_dec * self.g - self.sum_g0)
        if self.modes.prefill_cost:
            chunk = max(1.0, p.max_num_batched_tokens - self.n_dec)
            rate = chunk / (t_dec + chunk / p.prefill_tokens_per_s)
        else:
            rate = p.prefill_tokens_per_s
        count = req[4]
        self.n_waiting -= count
        self.n_prefill = count
        self.kv_prefilling += count * req[1]
        if not self.modes.preemption:
            self.reserved += count * (req[1] + req[2])
        self.current = (t + count * req[1] / rate, req, 1.5 * t_dec)

    def _join(self, t: float) -> None:
        """The prefill ended: its first token is out; the rest are decoded from here."""
        assert self.current is not None
        _, req, landing_s = self.current
        self.current = None
        count = req[4]
        self.n_prefill = 0
        self.kv_prefilling -= count * req[1]
        self.generated += count
        if not req[3]:
            req[3] = True
            self._first_tokens(t + landing_s - req[0], req[1], count)
        left = req[2] - 1
        run = _Run(req[0], req[1], self.g, self.g + left, req[1] + req[2], count)
        if left <= 0:
            self._done(run, t)
            return
        self._seq += 1
        heapq.heappush(self.heap, (run.end, self._seq, run))
        self.lifo.append(run)
        self.n_dec += count
        self.sum_kv_base += count * run.kv_base
        self.sum_g0 += count * run.g0

    def _first_tokens(self, ttft_s: float, prompt_tokens: int, count: int) -> None:
        self.metrics.ttft.observe(ttft_s, count)
        self.metrics.prompt_tokens += count * prompt_tokens
        if ttft_s <= self.slo_ttft_s:
            self.first_within_slo += count
        else:
            self.first_late += count

    def _retire(self, run: _Run, t: float) -> None:
        run.alive = False
        self._drop(run)
        self.generated += run.count * (run.end - run.g0)
        self._done(run, t)
        if len(self.lifo) > 2 * self.n_dec + 64:
            self.lifo = [r for r in self.lifo if r.alive]

    def _drop(self, run: _Run) -> None:
        self.n_dec -= run.count
        self.sum_kv_base -= run.count * run.kv_base
        self.sum_g0 -= run.count * run.g0

    def _done(self, run: _Run, t: float) -> None:
        self.metrics.stopped += run.count
        self.metrics.e2e.observe(t - run.arrival_s, run.count)
        if not self.modes.preemption:
            self.reserved -= run.count * run.reserved

    def _preempt_overflow(self) -> None:
        """vLLM's recompute preemption: the newest sequences go back to the queue's head."""
        cap = self.p.kv_capacity_tokens
        while self.n_dec > 1 and self.kv_used_tokens() > cap:
            run = self.lifo.pop()
            if not run.alive:
                continue
            run.alive = False
            made = self.g - run.g0
            self._drop(run)
            self.generated += run.count * made
            self.metrics.preemptions += run.count
            left = max(1, round(run.end - self.g))
            self.waiting.appendleft([run.arrival_s, run.kv_base + made, left + 1, True, run.count])
            self.n_waiting += run.count

    def abort_all(self) -> tuple[float, float]:
        """Preemption or drain deadline: (running, waiting) requests lost."""
        lost = (float(self.running), float(self.n_waiting))
        self.metrics.aborted += lost[0] + lost[1]
        self.generated = self.generation_tokens()
        for run in self.lifo:
            run.alive = False
        self.heap.clear()
        self.lifo.clear()
        self.waiting.clear()
        self.current = None
        self.n_dec = self.n_prefill = self.n_waiting = 0
        self.sum_kv_base = self.sum_g0 = self.kv_prefilling = self.reserved = 0.0
        return lost

    def samples(self) -> list[Sample]:
        """What this vLLM's /metrics serves, as parsed samples (V1 names, one engine)."""
        return self.metrics.samples(self.running, self.n_waiting, self.kv_usage_ratio(), self.generation_tokens())
