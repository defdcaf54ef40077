"""How much of its capacity a vLLM node is using, from what vLLM reports (pure).

A vLLM engine never idles while it has work: continuous batching runs one iteration
after another, each making one token for every running sequence. So busy time says
nothing; what says how loaded the engine is, is what its iterations are spent on.
An iteration costs a fixed part t0 (reading the weights, launching the kernels: what a
batch of one costs) plus parts that grow with the work (per sequence, per KV token
read, per prompt token prefilled). More load is absorbed by running bigger batches, so
the only time the engine could still give to more load is the fixed part it spends on
batches smaller than its KV cache could hold:

    t_iter      = running / generation_tokens_per_s     (mean iteration; Little's law on the batch)
    spare       = (t0 / t_iter) * (1 - running / full_batch)
    utilization = 1 - spare,   full_batch = running / kv_cache_usage  (capped at max_num_seqs)

(t0 / t_iter is the fixed part's share of the engine's time; running / full_batch the
share of those iterations a full batch would still need.) Every other cost grows with
the load, so utilization is the node's throughput as a fraction of what it serves at
saturation: linear in load, 1.0 at saturation whichever limit binds (prefill time, KV
cache, batch), whatever the GPU, model or request sizes.

t0 is learned on the node (`IterationFloor`: vLLM's median inter-token latency bounds
it from above at once; two operating points pin it once the node's load has varied),
or configured. Failure modes (bench/FLEET.md): until calibrated, t0 is known only from
above and utilization errs low (by ~20 % at the loads a fleet runs at); a request mix
that changes between the two points skews t0; a node bound by max_num_seqs needs that
value; KV usage that does not grow with the batch (prefix caching of a shared prompt)
makes full_batch too large.

`admissions_per_s` (requests started per second: generation tokens/s over the tokens a
request makes) turns the waiting queue into time (Little's law): waiting / admissions
is how long a new request waits before its prefill starts.
"""

from __future__ import annotations

import math


def _positive(value: float | None) -> float | None:
    if value is None or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


def iteration_s(running: float | None, generation_tokens_per_s: float | None) -> float | None:
    """Mean engine iteration: running / generation tokens per second (None: idle or unknown)."""
    r, g = _positive(running), _positive(generation_tokens_per_s)
    if r is None or g is None or r < 1.0:
        return None
    return r / g


def engine_utilization(
    running: float | None,
    generation_tokens_per_s: float | None,
    kv_cache_usage_ratio: float | None,
    floor_s: float | None,
    max_num_seqs: int | None = None,
) -> float | None:
    """The share of its saturation throughput the node is serving (formula above), 0..1."""
    t_iter, t0 = iteration_s(running, generation_tokens_per_s), _positive(floor_s)
    kv = kv_cache_usage_ratio
    if t_iter is None or t0 is None or kv is None or not math.isfinite(kv) or kv < 0:
        return None
    assert running is not None
    batch_share = min(1.0, kv)
    if max_num_seqs:
        batch_share = max(batch_share, min(1.0, running / max_num_seqs))
    spare = min(1.0, t0 / t_iter) * (1.0 - batch_share)
    return min(1.0, max(0.0, 1.0 - spare))


def admissions_per_s(generation_tokens_per_s: float | None, output_tokens_per_request: float | None) -> float | None:
    g, o = _positive(generation_tokens_per_s), _positive(output_tokens_per_request)
    return None if g is None or o is None else g / o


class IterationFloor:
    """t0, learned from two of the node's own operating points; `configured` replaces it.

    Utilization is linear in throughput (for one request mix), so the lightest point
    seen (t_l, kv_l, w_l) and a busier one (t, kv, w), w the tokens processed per
    second (prompt + generation), pin t0: with a = (1 - kv) * t_l / (t * (1 - kv_l))
    and r = w_l / w, the utilization at the busier point is (1 - a) / (1 - a * r), and
    t0 = t_l * (1 - r * utilization) / (1 - kv_l). A pair counts once the load is
    `spread` times the lightest point's (closer pairs amplify the noise); the widest
    pair seen sets t0, for good: it is the engine's, not the load's. Before a pair,
    vLLM's median inter-token latency (a decode-only iteration at the current batch)
    bounds t0 from above, and a pair may lower that bound by half at most. Points are
    averages of the recent readings (weight `weight` on the newest) with at least
    `min_batch` sequences running: a reading is noisy (the running gauge is
    instantaneous, the token rates a window's means; +-30 % at a steady load, far more
    at a batch of a few)."""

    __slots__ = ("_mean", "_widest", "bound_s", "configured", "floor_s", "lightest", "min_batch", "spread", "weight")

    def __init__(
        self, configured: float | None = None, *, weight: float = 0.25, spread: float = 1.25, min_batch: float = 8.0
    ) -> None:
        self.configured, self.weight, self.spread, self.min_batch = configured, weight, spread, min_batch
        self.bound_s: float | None = None
        self.floor_s: float | None = configured
        self.lightest: tuple[float, ...] | None = None  # (t_iter, kv, tokens/s, running)
        self._mean: tuple[float, ...] | None = None
        self._widest = 1.0  # r of the pair t0 came from

    def observe(
        self,
        t_iter_s: float | None,
        kv: float | None = None,
        tokens_per_s: float | None = None,
        itl_p50_s: float | None = None,
        running: float | None = None,
    ) -> float | None:
        if self.configured is not None:
            return self.floor_s
        if itl_p50_s is not None and itl_p50_s > 0:
            # vLLM's median inter-token latency, a decode-only iteration at the current
            # batch, bounds t0 from above (it is not lowered by load: no feedback loop).
            self.bound_s = itl_p50_s if self.bound_s is None else min(self.bound_s, itl_p50_s)
            if self._widest >= 1.0:
                self.floor_s = self.bound_s
        if t_iter_s is None or kv is None or not tokens_per_s or running is None:
            return self.floor_s
        point = (t_iter_s, min(kv, 0.99), tokens_per_s, running)
        if self._mean is not None:
            point = (*(m + self.weight * (x - m) for m, x in zip(self._mean, point, strict=True)),)  # type: ignore[assignment]
        self._mean = point
        if point[3] < self.min_batch:
            return self.floor_s
        if self.lightest is None or point[0] < self.lightest[0]:
            self.lightest = point
        r = self.lightest[2] / point[2]
        if r * self.spread <= 1.0 and r < self._widest:
            floor = _pair_floor(self.lightest, point)
            self._widest = r
            self.floor_s = floor if self.bound_s is None else min(self.bound_s, max(floor, self.bound_s / 2))
        return self.floor_s


def _pair_floor(light: tuple[float, ...], busy: tuple[float, ...]) -> float:
    (t_l, kv_l, w_l, _), (t, kv, w, _) = light, busy
    a, r = (1 - kv) * t_l / (t * (1 - kv_l)), w_l / w
    utilization = min(1.0, max(0.0, (1 - a) / (1 - a * r))) if a * r < 1 else 1.0
    return min(t_l, max(0.1 * t_l, t_l * (1 - r * utilization) / (1 - kv_l)))


class OutputTokens:
    """Tokens a request makes, from vLLM's counters: over the rounds between two
    readings when requests finished in between, else over the server's lifetime."""

    __slots__ = ("_last", "mean")

    def __init__(self) -> None:
        self._last: tuple[float, float] | None = None
        self.mean: float | None = None

    def observe(self, generation_tokens_total: float | None, requests_completed_total: float | None) -> float | None:
        g, n = generation_tokens_total, requests_completed_total
        if g is None or n is None or not (math.isfinite(g) and math.isfinite(n)):
            return self.mean
        last, self._last = self._last, (g, n)
        if last is not None and n > last[1] and g >= last[0]:
            self.mean = (g - last[0]) / (n - last[1])
        elif n > 0 and (self.mean is None or last is None or n < last[1] or g < last[0]):
            self.mean = g / n  # first reading, or vLLM restarted: its lifetime so far
        return self.mean
