"""Per-request traces: the Azure LLM inference trace format as is, the ways to scale,
tile and compress one, and the request streams the fleet draws its arrivals from.

Format (Azure/AzurePublicDataset `AzureLLMInferenceTrace_{conv,code}.csv`): a header
`TIMESTAMP,ContextTokens,GeneratedTokens`, then one row per request, in time order,
e.g. `2023-11-16 18:15:46.6805900,374,44`. Times are taken relative to the first row.

Transforms, each returning a new trace (bench/FLEET.md says which the study uses):

- `scale(trace, k)`: k times the requests, the trace's own shape kept: every request is
  copied k times (a fractional part keeps each extra copy with that probability), each
  copy moved by up to `jitter_s` [5 s] so copies do not land on the same instant. Bursts
  grow k-fold with the rest: the trace of a service with k times the users.
- `tile(trace, n)`: n copies end to end (a longer run of the same pattern).
- `compress(trace, k)`: time divided by k: k times the rate and every change k times faster.
- `superpose(a, b)`: both traces' requests together (conv + code: the "mixed" trace).

Streams hand out each step's arrivals as (time, prompt tokens, output tokens, count):
`RequestStream` replays a per-request trace (count 1; with per-minute means instead of
each request's sizes when `sizes` is "minute"), `RateStream` draws Poisson arrivals from
a rate trace (bench/fleet/trace.py) with lognormal sizes around the trace's means.
"""

from __future__ import annotations

import bisect
import csv
import datetime
import math
import random
from array import array
from dataclasses import dataclass
from pathlib import Path

from bench.fleet.trace import Trace, TraceError, poisson

AZURE_HEADER = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
# Lognormal spreads of the sizes drawn for rate traces, fitted to the Azure conv trace
# (prompt: median 1020, mean 1155, p95 4083 tokens; output: median 129, mean 211, p95 451).
PROMPT_SIGMA, OUTPUT_SIGMA = 0.8, 0.9
MAX_PROMPT_TOKENS, MAX_OUTPUT_TOKENS = 16_384, 4096


@dataclass(frozen=True, slots=True)
class RequestTrace:
    """One row per request: seconds from the start (sorted), prompt and output tokens."""

    name: str
    times_s: array
    prompt_tokens: array
    output_tokens: array
    duration_s: float

    def __len__(self) -> int:
        return len(self.times_s)

    def rate_at(self, t_s: float, window_s: float = 300.0) -> float:
        """Requests per second in the window centred on t_s (clipped to the trace)."""
        lo, hi = max(0.0, t_s - window_s / 2), min(self.duration_s, t_s + window_s / 2)
        n = bisect.bisect_left(self.times_s, hi) - bisect.bisect_left(self.times_s, lo)
        return n / (hi - lo) if hi > lo else 0.0

    def mean_tokens(self, start_s: float, end_s: float) -> tuple[float, float]:
        """Mean (prompt, output) tokens of the requests in [start_s, end_s)."""
        i, j = bisect.bisect_left(self.times_s, start_s), bisect.bisect_left(self.times_s, end_s)
        if j <= i:
            return 0.0, 0.0
        return sum(self.prompt_tokens[i:j]) / (j - i), sum(self.output_tokens[i:j]) / (j - i)


def _seconds(stamp: str) -> float:
    day, clock = stamp.strip().split(" ")
    hours, minutes, seconds = clock.split(":")
    return datetime.date.fromisoformat(day).toordinal() * 86400.0 + int(hours) * 3600 + int(minutes) * 60 + float(seconds)


def load_azure(path: Path, name: str | None = None) -> RequestTrace:
    """An Azure LLM inference trace CSV, as is. Raises TraceError naming the line."""
    times, prompts, outputs = array("d"), array("l"), array("l")
    with open(path, newline="", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = [cell.strip() for cell in next(rows, [])]
        if header != AZURE_HEADER:
            raise TraceError(f"{path}:1: header must be {','.join(AZURE_HEADER)}, got {header}")
        for lineno, row in enumerate(rows, start=2):
            try:
                stamp, prompt, output = row
                t, p, o = _seconds(stamp), int(prompt), int(output)
            except ValueError:
                raise TraceError(f"{path}:{lineno}: not TIMESTAMP,ContextTokens,GeneratedTokens: {row}") from None
            if p < 0 or o < 0 or (times and t < times[-1]):
                raise TraceError(f"{path}:{lineno}: tokens must be >= 0 and TIMESTAMP must not go backwards")
            times.append(t)
            prompts.append(p)
            outputs.append(o)
    if len(times) < 2:
        raise TraceError(f"{path}: a header and at least two rows are needed")
    start = times[0]
    rel = array("d", (t - start for t in times))
    return RequestTrace(name or path.stem, rel, prompts, outputs, rel[-1])


def _build(name: str, rows: list[tuple[float, int, int]], duration_s: float) -> RequestTrace:
    rows.sort()
    return RequestTrace(
        name, array("d", (r[0] for r in rows)), array("l", (r[1] for r in rows)), array("l", (r[2] for r in rows)), duration_s
    )


def _rows(trace: RequestTrace) -> list[tuple[float, int, int]]:
    return list(zip(trace.times_s, trace.prompt_tokens, trace.output_tokens, strict=False))


def scale(trace: RequestTrace, factor: float, *, seed: int = 1, jitter_s: float = 5.0) -> RequestTrace:
    if factor <= 0:
        raise ValueError("scale factor must be > 0")
    rng = random.Random(f"scale:{trace.name}:{factor}:{seed}")
    whole, part = int(factor), factor - int(factor)
    rows = []
    for t, p, o in _rows(trace):
        copies = whole + (1 if rng.random() < part else 0)
        rows += [(min(trace.duration_s, t + (rng.random() * jitter_s if c else 0.0)), p, o) for c in range(copies)]
    return _build(f"{trace.name}x{factor:g}", rows, trace.duration_s)


def tile(trace: RequestTrace, times: int) -> RequestTrace:
    if times < 1:
        raise ValueError("tile count must be >= 1")
    span = trace.duration_s
    rows = [(t + k * span, p, o) for k in range(times) for t, p, o in _rows(trace)]
    return _build(trace.name, rows, span * times)


def compress(trace: RequestTrace, factor: float) -> RequestTrace:
    if factor <= 0:
        raise ValueError("compression factor must be > 0")
    rows = [(t / factor, p, o) for t, p, o in _rows(trace)]
    return _build(trace.name, rows, trace.duration_s / factor)


def superpose(name: str, *traces: RequestTrace) -> RequestTrace:
    rows = [row for trace in traces for row in _rows(trace)]
    return _build(name, rows, max(trace.duration_s for trace in traces))


class RequestStream:
    """Replays a per-request trace; `sizes` "request" (each its own) or "minute" (the
    mean of its minute, the per-minute-means model the issue replaced)."""

    def __init__(self, trace: RequestTrace, sizes: str = "request") -> None:
        self.trace, self.name, self.duration_s = trace, trace.name, trace.duration_s
        self._i = 0
        self._minute: dict[int, tuple[int, int]] = {}
        if sizes == "minute":
            for minute in range(int(trace.duration_s // 60) + 1):
                p, o = trace.mean_tokens(minute * 60.0, (minute + 1) * 60.0)
                self._minute[minute] = (max(1, round(p)), max(1, round(o)))

    def arrivals(self, t0_s: float, dt_s: float) -> list[tuple[float, int, int, int]]:
        times, end = self.trace.times_s, t0_s + dt_s
        i = self._i
        j = bisect.bisect_left(times, end, lo=i)
        self._i = j
        prompts, outputs = self.trace.prompt_tokens, self.trace.output_tokens
        if self._minute:
            return [(times[k], *self._minute[int(times[k] // 60)], 1) for k in range(i, j)]
        return [(times[k], max(1, prompts[k]), max(1, outputs[k]), 1) for k in range(i, j)]

    def rate_at(self, t_s: float) -> float:
        return self.trace.rate_at(t_s)

    def mean_tokens(self, start_s: float, end_s: float) -> tuple[float, float]:
        return self.trace.mean_tokens(start_s, end_s)


class RateStream:
    """Poisson arrivals from a rate trace, in cohorts of `cohort` identical requests (a
    cost knob for the day-long sample traces; 1 is request by request), sizes lognormal
    around the trace's means (or `default_tokens`); `sizes` "minute": the means themselves."""

    def __init__(self, trace: Trace, default_tokens: tuple[float, float], *, seed: int = 1, sizes: str = "request", cohort: int = 1) -> None:
        self.trace, self.name, self.duration_s = trace, trace.name, trace.duration_s
        self.default_tokens, self.sizes, self.cohort = default_tokens, sizes, max(1, cohort)
        self.rng = random.Random(f"arrivals:{trace.name}:{seed}")
        pool_rng = random.Random(f"sizes:{trace.name}:{seed}")
        # Unit-mean lognormal factors, drawn once: a request takes the next pair.
        self._pool = [
            (
                math.exp(PROMPT_SIGMA * pool_rng.gauss(0, 1) - PROMPT_SIGMA**2 / 2),
                math.exp(OUTPUT_SIGMA * pool_rng.gauss(0, 1) - OUTPUT_SIGMA**2 / 2),
            )
            for _ in range(1 << 15)
        ]
        self._k = 0

    def _means(self, t_s: float) -> tuple[float, float]:
        return self.trace.tokens_at(t_s) or self.default_tokens

    def arrivals(self, t0_s: float, dt_s: float) -> list[tuple[float, int, int, int]]:
        rng, c = self.rng, self.cohort
        n = poisson(rng, self.trace.rate_at(t0_s + dt_s / 2) * dt_s / c)
        mean_p, mean_o = self._means(t0_s)
        if self.sizes == "minute":
            p, o = max(1, round(mean_p)), max(1, round(mean_o))
            return [(t, p, o, c) for t in sorted(t0_s + rng.random() * dt_s for _ in range(n))]
        pool, k, size = self._pool, self._k, len(self._pool)
        out = []
        for i, t in enumerate(sorted(t0_s + rng.random() * dt_s for _ in range(n))):
            fp, fo = pool[(k + i) % size]
            out.append(
                (t, min(MAX_PROMPT_TOKENS, max(1, round(mean_p * fp))), min(MAX_OUTPUT_TOKENS, max(1, round(mean_o * fo))), c)
            )
        self._k = (k + n) % size
        return out

    def rate_at(self, t_s: float) -> float:
        return self.trace.rate_at(t_s)

    def mean_tokens(self, start_s: float, end_s: float) -> tuple[float, float]:
        return self._means(start_s)
