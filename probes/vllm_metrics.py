"""vLLM's /metrics as node signals: one scrape summarized (`summarize`), a sliding
window of scrapes turned into rates, latency quantiles and goodput (`VllmWindow`),
and the reading and probe built on them live in probes/vllm.py.

Both metric generations are read: V0 (`model_name` label only,
`vllm:gpu_cache_usage_perc`, `vllm:time_per_output_token_seconds`) and V1
(`model_name` + `engine` labels, `vllm:kv_cache_usage_perc`,
`vllm:inter_token_latency_seconds`); the new name wins when both are served.
Aggregation over engines and models: counters, histogram buckets, running and
waiting are summed; KV-cache usage is the MAX over engines (the fullest engine
is the one that starts preempting and queueing, an average would hide it).
Gauges repeated per process with a `pid` label (prometheus_client multiprocess
mode, `--api-server-count > 1`) are max'ed over pids, never summed. Samples
named `<name>_created` are only ever ignored: names are matched exactly.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from probes.histogram import Histogram, goodput, merge_series
from probes.prom_text import PromParseError, Sample

log = logging.getLogger(__name__)

RUNNING, WAITING = "vllm:num_requests_running", "vllm:num_requests_waiting"
KV_V1, KV_V0 = "vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"
TTFT = "vllm:time_to_first_token_seconds"
TPOT_V1, TPOT_V0 = "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds"
REQUEST_TPOT = "vllm:request_time_per_output_token_seconds"  # one observation per request
E2E = "vllm:e2e_request_latency_seconds"
PROMPT, GENERATION = "vllm:prompt_tokens_total", "vllm:generation_tokens_total"
SUCCESS = "vllm:request_success_total"
CACHE_INFO, SLEEP = "vllm:cache_config_info", "vllm:engine_sleep_state"
# Newer vLLM: why requests wait (capacity | deferred: KV transfer or LoRA budget),
# whether each engine is healthy, and how long requests sat in the queue.
WAITING_BY_REASON, ENGINE_HEALTHY = "vllm:num_requests_waiting_by_reason", "vllm:engine_healthy"
QUEUE_TIME = "vllm:request_queue_time_seconds"
WAITING_REASONS = frozenset({"capacity", "deferred"})
_HISTOGRAMS = (TTFT, TPOT_V1, TPOT_V0, REQUEST_TPOT, E2E, QUEUE_TIME)
_BUCKETS = {f"{name}_bucket": name for name in _HISTOGRAMS}
_GAUGES = frozenset({RUNNING, WAITING, KV_V1, KV_V0, SLEEP, WAITING_BY_REASON, ENGINE_HEALTHY})
# Every sample name ScrapeAccumulator.feed reads: the probe's parser skips the rest of
# a scrape unparsed (two thirds of a 4-engine V1 server's 1,500 lines).
SAMPLE_NAMES = frozenset({*_BUCKETS, *_GAUGES, PROMPT, GENERATION, SUCCESS, CACHE_INFO})
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}
# finished_reason values re-exported as they are (vLLM's own set); any other value is
# folded into "other", so a misbehaving server cannot grow our /metrics or /status.
FINISHED_REASONS = frozenset({"stop", "length", "abort", "error", "repetition"})
MAX_MODELS = 16  # model names kept in a reading; more are counted, not listed
MAX_ENGINES = 64  # cache_config_info entries kept (one per engine)


class InvalidScrape(PromParseError):
    """Well-formed text whose numbers cannot be true (negative or non-finite gauges, a
    KV usage outside 0-1): the scrape is dropped, never read as "empty"."""


_ROUNDING = 1e-9  # a ratio computed as 1 - free/total can land a hair outside 0-1


def _check(name: str, labels: Mapping[str, str], value: float, top: float = math.inf) -> float:
    """The value, clamped by float rounding only; anything further out is impossible."""
    # NaN fails every comparison; a bound of inf still needs +Inf caught by name.
    if not -_ROUNDING <= value <= top + _ROUNDING or value == math.inf:
        raise InvalidScrape(f"{name}{dict(labels)} = {value}: not a possible value")
    return min(max(value, 0.0), top)


@dataclass(frozen=True, slots=True)
class VllmScrape:
    """One /metrics scrape, aggregated over engines and models (see the module docstring)."""

    requests_running: float
    requests_waiting: float
    kv_usage_by_engine: dict[str, float]
    prompt_tokens_total: float | None
    generation_tokens_total: float | None
    finished_total: dict[str, float]
    histograms: dict[str, Histogram]  # keyed by family name; only those served
    engines: int
    models: tuple[str, ...]
    metric_names: str  # v1, v0 or mixed
    engine_sleeping: bool | None
    cache_info: tuple[dict[str, str], ...]  # vllm:cache_config_info labels, one per engine
    waiting_by_reason: dict[str, float] = field(default_factory=dict)  # capacity / deferred, where served
    engines_unhealthy: int | None = None  # engines whose vllm:engine_healthy is 0 (None: not served)

    @property
    def queue_waiting(self) -> float:
        """The queue the autoscalers see: requests waiting for capacity. Requests deferred
        for a KV transfer or a LoRA budget are not demand for more nodes; where vLLM does
        not say why requests wait, all of them."""
        if "capacity" in self.waiting_by_reason:
            return self.waiting_by_reason["capacity"]
        return self.requests_waiting

    @property
    def kv_cache_usage_ratio(self) -> float | None:
        return max(self.kv_usage_by_engine.values()) if self.kv_usage_by_engine else None

    def histogram(self, *names: str) -> tuple[str, Histogram] | None:
        """The first of `names` this scrape serves (the new name is listed first)."""
        for name in names:
            if name in self.histograms:
                return name, self.histograms[name]
        return None


def summarize(samples: Iterable[Sample]) -> VllmScrape:
    """Aggregate one scrape. Raises PromParseError when it is not a usable vLLM exposition."""
    acc = ScrapeAccumulator()
    acc.feed(samples)
    return acc.finish()


class ScrapeAccumulator:
    """`summarize` in steps: `feed()` batches of samples as they are parsed (the probe
    yields to the event loop between batches), then `finish()`."""

    def __init__(self) -> None:
        self._gauges: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in _GAUGES}
        self._counters = {PROMPT: 0.0, GENERATION: 0.0}
        self._seen: set[str] = set()
        self._finished: dict[str, float] = {}
        self._buckets: dict[str, dict[tuple[str | None, ...], dict[str, float]]] = {name: {} for name in _HISTOGRAMS}
        self._cache_info: list[dict[str, str]] = []
        self._merged: dict[str, Histogram] = {}

    def feed(self, samples: Iterable[Sample]) -> None:
        gauges, counters, buckets = self._gauges, self._counters, self._buckets
        for name, labels, value, _ in samples:
            if name in _BUCKETS:
                _check(name, labels, value)
                histogram_key = (labels.get("engine"), labels.get("model_name"), labels.get("pid"))
                buckets[_BUCKETS[name]].setdefault(histogram_key, {})[labels.get("le", "")] = value
            elif name in _GAUGES:
                value = _check(name, labels, value, 1.0 if name in (KV_V1, KV_V0) else math.inf)
                key = tuple(f"{k}={v}" for k, v in labels.items() if k != "pid")
                series = gauges[name]
                series[key] = max(value, series.get(key, value))
            elif name in counters:
                _check(name, labels, value)
                counters[name] += value
                self._seen.add(name)
            elif name == SUCCESS:
                _check(name, labels, value)
                reason = labels.get("finished_reason", "unknown")
                reason = reason if reason in FINISHED_REASONS else "other"
                self._finished[reason] = self._finished.get(reason, 0.0) + value
            elif name == CACHE_INFO and len(self._cache_info) < MAX_ENGINES:
                self._cache_info.append(dict(labels))

    def merge_next(self) -> bool:
        """Merge one more histogram family over its series (after the last `feed`); False
        when none is left. A caller on an event loop yields between calls: merging the
        four engines' buckets of all six families at once took ~0.4 ms."""
        for name, series in self._buckets.items():
            if series and name not in self._merged:
                self._merged[name] = merge_series(name, series)
                return True
        return False

    def finish(self) -> VllmScrape:
        gauges, counters = self._gauges, self._counters
        if not gauges[RUNNING] or not gauges[WAITING]:
            raise PromParseError(f"no {RUNNING} / {WAITING}: not a vLLM exposition (or its stats are disabled)")
        while self.merge_next():
            pass
        histograms = dict(self._merged)  # in _HISTOGRAMS order: merge_next walks _buckets, built in that order
        return VllmScrape(
            requests_running=sum(gauges[RUNNING].values()),
            requests_waiting=sum(gauges[WAITING].values()),
            kv_usage_by_engine=_by_engine(gauges[KV_V1] or gauges[KV_V0]),
            prompt_tokens_total=counters[PROMPT] if PROMPT in self._seen else None,
            generation_tokens_total=counters[GENERATION] if GENERATION in self._seen else None,
            finished_total=self._finished,
            histograms=histograms,
            engines=len({_label(key, "engine") for key in gauges[RUNNING]}),
            models=_models(gauges[RUNNING]),
            metric_names=_generation(gauges, histograms, gauges[RUNNING]),
            engine_sleeping=_sleeping(gauges[SLEEP]),
            cache_info=tuple(self._cache_info),
            waiting_by_reason=_by_reason(gauges[WAITING_BY_REASON]),
            engines_unhealthy=sum(1 for value in gauges[ENGINE_HEALTHY].values() if value == 0)
            if gauges[ENGINE_HEALTHY]
            else None,
        )


def _by_reason(series: dict[tuple[str, ...], float]) -> dict[str, float]:
    """Summed over engines; reasons outside vLLM's own set are left out (not folded: the
    two named ones must add up to what the autoscalers see)."""
    totals: dict[str, float] = {}
    for key, value in series.items():
        reason = _label(key, "reason")
        if reason in WAITING_REASONS:
            totals[reason] = totals.get(reason, 0.0) + value
    return totals


def _models(running: dict[tuple[str, ...], float]) -> tuple[str, ...]:
    names = sorted({m for key in running if (m := _label(key, "model_name")) is not None})
    if len(names) <= MAX_MODELS:
        return tuple(names)
    return (*names[:MAX_MODELS], f"... and {len(names) - MAX_MODELS} more")


def _label(key: tuple[str, ...], name: str) -> str | None:
    prefix = name + "="
    return next((part[len(prefix) :] for part in key if part.startswith(prefix)), None)


def _by_engine(series: dict[tuple[str, ...], float]) -> dict[str, float]:
    usage: dict[str, float] = {}
    for key, value in series.items():
        engine = _label(key, "engine") or "0"
        usage[engine] = max(value, usage.get(engine, value))
    return usage


def _generation(
    gauges: dict[str, dict[tuple[str, ...], float]], histograms: dict[str, Histogram], running: dict[tuple[str, ...], float]
) -> str:
    new = bool(gauges[KV_V1]) or TPOT_V1 in histograms
    old = bool(gauges[KV_V0]) or TPOT_V0 in histograms
    if new and old:
        return "mixed"
    if new or old:
        return "v1" if new else "v0"
    return "v1" if any(_label(key, "engine") is not None for key in running) else "v0"


def _sleeping(series: dict[tuple[str, ...], float]) -> bool | None:
    """Any engine with awake == 0 is asleep (vLLM puts all engines to sleep together)."""
    awake = [value for key, value in series.items() if "sleep_state=awake" in key or "state=awake" in key]
    return None if not awake else any(value == 0 for value in awake)


@dataclass(frozen=True, slots=True)
class WindowStats:
    """What the window says; every None has a line in `notes` saying why."""

    window_s: float
    prompt_tokens_per_s: float | None
    generation_tokens_per_s: float | None
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    goodput_ratio: float | None
    notes: tuple[str, ...]
    queue_time_s: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(QUANTILES))


class VllmWindow:
    """Time-stamped scrapes over a sliding window; times are passed in (no clock here).

    Rates and latency quantiles come from the oldest and newest scrape in the
    window: counter deltas over the time between them, and histogram bucket
    deltas (what happened inside the window, not since boot), with the same
    in-bucket linear interpolation as Prometheus' histogram_quantile.

    A counter going backwards (vLLM restarted), a histogram whose buckets
    changed or vanished, or a change in the number of engines restarts the
    window: rates are then None until a second scrape arrives, never negative.

    Goodput is the share of the window's requests within both SLOs. The
    histograms give the TTFT and TPOT distributions separately, not per request,
    so it is min(share with TTFT <= slo_ttft, share with TPOT <= slo_tpot): exact
    when the slow requests are the same on both counts (overload slows both) and
    otherwise an upper bound. TPOT there is the per-request histogram
    (vllm:request_time_per_output_token_seconds) when served, else the per-token
    one; with only one of the two, goodput is that one share.
    """

    def __init__(self, window_s: float = 60.0, max_points: int = 1024) -> None:
        if window_s <= 0:
            raise ValueError("window_s must be > 0")
        self.window_s = window_s
        self._points: deque[tuple[float, VllmScrape]] = deque(maxlen=max_points)
        self.restarts = 0

    def __len__(self) -> int:
        return len(self._points)

    def add(self, t: float, scrape: VllmScrape) -> bool:
        """Add a scrape taken at `t`; True when it restarted the window."""
        restarted = False
        if self._points:
            last_t, last = self._points[-1]
            if t < last_t or _restarted(last, scrape):
                self._points.clear()
                self.restarts += 1
                restarted = True
            elif t == last_t:
                self._points.pop()
        self._points.append((t, scrape))
        while t - self._points[0][0] > self.window_s:
            self._points.popleft()
        return restarted

    def derive(self, slo_ttft_s: float, slo_tpot_s: float) -> WindowStats:
        if not self._points:
            none: dict[str, float | None] = dict.fromkeys(QUANTILES)
            return WindowStats(0.0, None, None, none, dict(none), dict(none), None, ("no scrape in the window yet",))
        (t0, old), (t1, new) = self._points[0], self._points[-1]
        span_s = t1 - t0
        notes: list[str] = []
        if span_s <= 0:
            notes.append("one scrape in the window: rates and quantiles need two")
        deltas = {
            name: _delta(old, new, names, name, notes)
            for name, names in (("ttft", (TTFT,)), ("tpot", (TPOT_V1, TPOT_V0)), ("e2e", (E2E,)))
        }
        request_tpot = _delta(old, new, (REQUEST_TPOT,), "request tpot", []) or deltas["tpot"]
        share = goodput(deltas["ttft"], slo_ttft_s, request_tpot, slo_tpot_s)
        if share is None:
            notes.append("goodput: no request in the window, or no finite bucket to judge it by")
        return WindowStats(
            window_s=span_s,
            prompt_tokens_per_s=_rate(old.prompt_tokens_total, new.prompt_tokens_total, span_s),
            generation_tokens_per_s=_rate(old.generation_tokens_total, new.generation_tokens_total, span_s),
            ttft_s=_quantiles(deltas["ttft"], "ttft", notes),
            tpot_s=_quantiles(deltas["tpot"], "tpot", notes),
            e2e_s=_quantiles(deltas["e2e"], "e2e", notes),
            goodput_ratio=share,
            notes=tuple(notes),
            queue_time_s=_quantiles(_delta(old, new, (QUEUE_TIME,), "queue time", []), "queue time", []),
        )


def _restarted(old: VllmScrape, new: VllmScrape) -> bool:
    if old.engines != new.engines:
        return True
    for before, after in (
        (old.prompt_tokens_total, new.prompt_tokens_total),
        (old.generation_tokens_total, new.generation_tokens_total),
    ):
        if before is not None and (after is None or after < before):
            return True
    if any(new.finished_total.get(reason, 0.0) < count for reason, count in old.finished_total.items()):
        return True
    for name, hist in old.histograms.items():
        now = new.histograms.get(name)
        if now is None or now.bounds != hist.bounds or now.total < hist.total:
            return True
    return False


def _rate(before: float | None, after: float | None, span_s: float) -> float | None:
    if before is None or after is None or span_s <= 0:
        return None
    return (after - before) / span_s


def _delta(old: VllmScrape, new: VllmScrape, names: tuple[str, ...], what: str, notes: list[str]) -> Histogram | None:
    found = new.histogram(*names)
    if found is None:
        notes.append(f"{what}: vLLM serves no {' / '.join(names)}")
        return None
    name, hist = found
    before = old.histograms.get(name)
    if before is None:
        notes.append(f"{what}: {name} was not in the window's first scrape")
        return None
    return hist.minus(before)


def _quantiles(delta: Histogram | None, what: str, notes: list[str]) -> dict[str, float | None]:
    empty: dict[str, float | None] = dict.fromkeys(QUANTILES)
    if delta is None:
        return empty
    if not delta.bounds:
        notes.append(f"{what}: the histogram has only the +Inf bucket")
        return empty
    if delta.total <= 0:
        notes.append(f"{what}: no observation in the window")
        return empty
    return {key: delta.quantile(q) for key, q in QUANTILES.items()}
