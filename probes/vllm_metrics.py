"""vLLM's /metrics as node signals: one scrape summarized (`summarize`), a sliding
window of scrapes turned into rates, latency quantiles and goodput (`VllmWindow`),
and the probe that fetches it (`VllmMetricsProbe`).

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

import asyncio
import errno
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import aiohttp

from probes.base import ProbeError
from probes.prom_text import PromParseError, PromParser, Sample

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
_HISTOGRAMS = (TTFT, TPOT_V1, TPOT_V0, REQUEST_TPOT, E2E)
_BUCKETS = {f"{name}_bucket": name for name in _HISTOGRAMS}
_GAUGES = frozenset({RUNNING, WAITING, KV_V1, KV_V0, SLEEP})
QUANTILES = {"p50": 0.5, "p95": 0.95, "p99": 0.99}


@dataclass(frozen=True, slots=True)
class Histogram:
    """Cumulative bucket counts; `bounds` are the finite `le` values as served."""

    bounds: tuple[float, ...]
    cumulative: tuple[float, ...]  # count <= each bound, then the +Inf bucket (the total)

    @property
    def total(self) -> float:
        return self.cumulative[-1]

    def minus(self, older: Histogram) -> Histogram | None:
        """What was observed between `older` and this one; None if the buckets differ."""
        if older.bounds != self.bounds:
            return None
        return Histogram(self.bounds, tuple(a - b for a, b in zip(self.cumulative, older.cumulative)))

    def quantile(self, q: float) -> float | None:
        """Prometheus' histogram_quantile: linear inside the bucket; in +Inf -> the last bound."""
        cum = _monotonic(self.cumulative)
        if not self.bounds or cum[-1] <= 0:
            return None
        rank = q * cum[-1]
        i = next(i for i, count in enumerate(cum) if count >= rank)
        if i == len(self.bounds):
            return self.bounds[-1]
        if i == 0 and self.bounds[0] <= 0:
            return self.bounds[0]
        lower, below = (self.bounds[i - 1], cum[i - 1]) if i else (0.0, 0.0)
        return lower + (self.bounds[i] - lower) * (rank - below) / (cum[i] - below)

    def share_at_most(self, x: float) -> float | None:
        """Share of observations <= x, linear inside the bucket; +Inf ones count as above."""
        cum = _monotonic(self.cumulative)
        if not self.bounds or cum[-1] <= 0:
            return None
        for i, upper in enumerate(self.bounds):
            if x < upper:
                lower, below = (self.bounds[i - 1], cum[i - 1]) if i else (0.0, 0.0)
                fraction = max(0.0, (x - lower) / (upper - lower)) if upper > lower else 1.0
                return (below + (cum[i] - below) * fraction) / cum[-1]
        return cum[len(self.bounds) - 1] / cum[-1]


def _monotonic(values: tuple[float, ...]) -> list[float]:
    # A scrape racing an observe() can show a bucket one below its neighbour; Prometheus evens it out too.
    out, top = [], 0.0
    for value in values:
        top = max(top, value)
        out.append(top)
    return out


def merge_series(name: str, series: dict[tuple[str | None, ...], dict[str, float]]) -> Histogram:
    """Sum the per-engine/model series of one histogram, on the bounds they all share."""
    parsed: list[dict[float, float]] = []
    for buckets in series.values():
        if "+Inf" not in buckets:
            raise PromParseError(f"{name}: a series has no +Inf bucket (truncated?)")
        try:
            parsed.append({float(le): count for le, count in buckets.items()})
        except ValueError:
            raise PromParseError(f"{name}: bad le in {sorted(buckets)}") from None
    common = set.intersection(*(set(p) for p in parsed))
    bounds = tuple(sorted(b for b in common if b != float("inf")))
    cumulative = tuple(sum(p[b] for p in parsed) for b in (*bounds, float("inf")))
    return Histogram(bounds, cumulative)


def goodput(ttft: Histogram | None, slo_ttft_s: float, tpot: Histogram | None, slo_tpot_s: float) -> float | None:
    """min of the two shares within their SLO (see VllmWindow for why min)."""
    shares = [s for h, slo in ((ttft, slo_ttft_s), (tpot, slo_tpot_s)) if h is not None and (s := h.share_at_most(slo)) is not None]
    return min(shares) if shares else None


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
    gauges: dict[str, dict[tuple[str, ...], float]] = {name: {} for name in _GAUGES}
    counters = {PROMPT: 0.0, GENERATION: 0.0}
    seen: set[str] = set()
    finished: dict[str, float] = {}
    buckets: dict[str, dict[tuple[str | None, ...], dict[str, float]]] = {name: {} for name in _HISTOGRAMS}
    cache_info: list[dict[str, str]] = []
    for name, labels, value, _ in samples:
        if name in _BUCKETS:
            key = (labels.get("engine"), labels.get("model_name"), labels.get("pid"))
            buckets[_BUCKETS[name]].setdefault(key, {})[labels.get("le", "")] = value
        elif name in _GAUGES:
            key = tuple(f"{k}={v}" for k, v in labels.items() if k != "pid")
            series = gauges[name]
            series[key] = max(value, series.get(key, value))
        elif name in counters:
            counters[name] += value
            seen.add(name)
        elif name == SUCCESS:
            reason = labels.get("finished_reason", "unknown")
            finished[reason] = finished.get(reason, 0.0) + value
        elif name == CACHE_INFO:
            cache_info.append(dict(labels))
    if not gauges[RUNNING] or not gauges[WAITING]:
        raise PromParseError(f"no {RUNNING} / {WAITING}: not a vLLM exposition (or its stats are disabled)")
    histograms = {name: merge_series(name, series) for name, series in buckets.items() if series}
    return VllmScrape(
        requests_running=sum(gauges[RUNNING].values()),
        requests_waiting=sum(gauges[WAITING].values()),
        kv_usage_by_engine=_by_engine(gauges[KV_V1] or gauges[KV_V0]),
        prompt_tokens_total=counters[PROMPT] if PROMPT in seen else None,
        generation_tokens_total=counters[GENERATION] if GENERATION in seen else None,
        finished_total=finished,
        histograms=histograms,
        engines=len({_label(key, "engine") for key in gauges[RUNNING]}),
        models=tuple(sorted({m for key in gauges[RUNNING] if (m := _label(key, "model_name")) is not None})),
        metric_names=_generation(gauges, histograms, gauges[RUNNING]),
        engine_sleeping=_sleeping(gauges[SLEEP]),
        cache_info=tuple(cache_info),
    )


def _label(key: tuple[str, ...], name: str) -> str | None:
    prefix = name + "="
    return next((part[len(prefix):] for part in key if part.startswith(prefix)), None)


def _by_engine(series: dict[tuple[str, ...], float]) -> dict[str, float]:
    usage: dict[str, float] = {}
    for key, value in series.items():
        engine = _label(key, "engine") or "0"
        usage[engine] = max(value, usage.get(engine, value))
    return usage


def _generation(gauges: dict[str, dict[tuple[str, ...], float]], histograms: dict[str, Histogram], running: dict[tuple[str, ...], float]) -> str:
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
        deltas = {name: _delta(old, new, names, name, notes) for name, names in (("ttft", (TTFT,)), ("tpot", (TPOT_V1, TPOT_V0)), ("e2e", (E2E,)))}
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
        )


def _restarted(old: VllmScrape, new: VllmScrape) -> bool:
    if old.engines != new.engines:
        return True
    for before, after in ((old.prompt_tokens_total, new.prompt_tokens_total), (old.generation_tokens_total, new.generation_tokens_total)):
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


@dataclass(frozen=True, slots=True)
class VllmReading:
    """The probe's reading (snapshot key "vllm"). Latency dicts have keys p50, p95, p99.

    `window_s` is the time actually covered by the window's oldest and newest
    scrape (0 with a single scrape). `notes` says why a value is None.
    """

    requests_running: float
    requests_waiting: float
    in_flight: float
    kv_cache_usage_ratio: float | None
    kv_cache_capacity_bytes: float | None
    kv_cache_used_bytes: float | None
    kv_capacity_source: str
    prompt_tokens_per_s: float | None
    generation_tokens_per_s: float | None
    ttft_s: dict[str, float | None]
    tpot_s: dict[str, float | None]
    e2e_s: dict[str, float | None]
    goodput_ratio: float | None
    requests_finished_total: dict[str, float]
    requests_completed_total: float
    requests_aborted_total: float
    window_s: float
    engines: int
    models: tuple[str, ...]
    metric_names: str
    engine_sleeping: bool | None
    notes: tuple[str, ...] = ()


def kv_capacity(
    scrape: VllmScrape, *, configured_bytes: float | None = None, bytes_per_token: float | None = None
) -> tuple[float | None, float | None, str]:
    """(capacity_bytes, used_bytes, how it was known or why not).

    vLLM exports no bytes gauge. In order: a configured node capacity (used =
    capacity x the mean usage over engines, as engines are the same size); the sum of
    `kv_cache_memory_bytes` from vllm:cache_config_info (set with --kv-cache-memory,
    a per-GPU figure: with tensor parallelism configure the capacity instead);
    the cache size in tokens (kv_cache_size_tokens, else num_gpu_blocks x
    block_size) times a configured per-token KV size.
    """
    usage = scrape.kv_usage_by_engine
    if configured_bytes is not None:
        mean = sum(usage.values()) / len(usage) if usage else None
        return configured_bytes, None if mean is None else configured_bytes * mean, "configured kv_cache_capacity_bytes"
    if not scrape.cache_info:
        return None, None, f"unknown: no {CACHE_INFO} in the scrape"
    per_engine = {info.get("engine", "0"): _number(info.get("kv_cache_memory_bytes")) for info in scrape.cache_info}
    source = f"{CACHE_INFO} kv_cache_memory_bytes"
    if None in per_engine.values():
        tokens = {info.get("engine", "0"): _cache_tokens(info) for info in scrape.cache_info}
        if bytes_per_token is None or None in tokens.values():
            return None, None, "unknown: kv_cache_memory_bytes is None and no per-token KV size is configured"
        per_engine = {engine: count * bytes_per_token for engine, count in tokens.items() if count is not None}
        source = f"{CACHE_INFO} cache size in tokens x configured bytes per token"
    sized = {engine: value for engine, value in per_engine.items() if value is not None}
    used = sum(value * usage[engine] for engine, value in sized.items() if engine in usage) if usage else None
    return sum(sized.values()), used, source


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "None") else None
    except ValueError:
        return None


def _cache_tokens(info: dict[str, str]) -> float | None:
    tokens = _number(info.get("kv_cache_size_tokens"))
    if tokens is not None:
        return tokens
    blocks, size = _number(info.get("num_gpu_blocks")), _number(info.get("block_size"))
    return None if blocks is None or size is None else blocks * size


def make_reading(scrape: VllmScrape, stats: WindowStats, capacity: tuple[float | None, float | None, str]) -> VllmReading:
    finished = dict(scrape.finished_total)
    aborted = finished.get("abort", 0.0)
    return VllmReading(
        requests_running=scrape.requests_running,
        requests_waiting=scrape.requests_waiting,
        in_flight=scrape.requests_running + scrape.requests_waiting,
        kv_cache_usage_ratio=scrape.kv_cache_usage_ratio,
        kv_cache_capacity_bytes=capacity[0],
        kv_cache_used_bytes=capacity[1],
        kv_capacity_source=capacity[2],
        prompt_tokens_per_s=stats.prompt_tokens_per_s,
        generation_tokens_per_s=stats.generation_tokens_per_s,
        ttft_s=stats.ttft_s,
        tpot_s=stats.tpot_s,
        e2e_s=stats.e2e_s,
        goodput_ratio=stats.goodput_ratio,
        requests_finished_total=finished,
        requests_completed_total=sum(finished.values()) - aborted,
        requests_aborted_total=aborted,
        window_s=stats.window_s,
        engines=scrape.engines,
        models=scrape.models,
        metric_names=scrape.metric_names,
        engine_sleeping=scrape.engine_sleeping,
        notes=stats.notes,
    )


class VllmMetricsProbe:
    """Probe "vllm": GET {base_url}/metrics with a size cap and a deadline, then
    summarize + window. A failed scrape raises ProbeError and leaves the window as it was.

    Codes: refused (not listening: loading or gone; a drain counts that as empty),
    timeout, http_<status>, too_large, connection, garbage.
    """

    name = "vllm"

    def __init__(
        self,
        base_url: str,
        session: aiohttp.ClientSession,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 3.0,
        max_bytes: int = 8 * 1024 * 1024,
        slo_ttft_ms: float = 2000.0,
        slo_tpot_ms: float = 100.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        kv_cache_capacity_bytes: float | None = None,
        kv_cache_bytes_per_token: float | None = None,
    ) -> None:
        self._url = base_url.rstrip("/") + "/metrics"
        self._session = session
        self.interval_s = interval_s
        # The runner's deadline sits above ours so a slow vLLM gets our "timeout" code and message.
        self.timeout_s = timeout_s + 1.0
        self._call_timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._slo_ttft_s = slo_ttft_ms / 1000.0
        self._slo_tpot_s = slo_tpot_ms / 1000.0
        self._clock = clock
        self._capacity = {"configured_bytes": kv_cache_capacity_bytes, "bytes_per_token": kv_cache_bytes_per_token}
        self._parser = PromParser()
        self.window = VllmWindow(window_s)

    async def sample(self) -> VllmReading:
        body = await self._fetch()
        taken_at = self._clock()
        try:
            scrape = summarize(self._parser.parse_bytes(body).samples)
        except PromParseError as exc:
            raise ProbeError(f"/metrics is not a usable vLLM exposition: {exc}", code="garbage") from None
        if self.window.add(taken_at, scrape):
            log.info("vLLM counters went backwards or its engines changed: restarted? the rate window starts again")
        stats = self.window.derive(self._slo_ttft_s, self._slo_tpot_s)
        return make_reading(scrape, stats, kv_capacity(scrape, **self._capacity))

    async def _fetch(self) -> bytes:
        # identity: gzip on loopback only costs CPU on both ends, and the cap must count real bytes.
        headers = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}
        try:
            async with asyncio.timeout(self._call_timeout_s):
                async with self._session.get(self._url, headers=headers, allow_redirects=False) as resp:
                    if resp.status != 200:
                        raise ProbeError(f"/metrics answered {resp.status}", code=f"http_{resp.status}")
                    return await self._read_capped(resp)
        except TimeoutError:
            raise ProbeError(f"/metrics did not answer within {self._call_timeout_s:g}s", code="timeout") from None
        except aiohttp.ClientConnectorError as exc:
            if getattr(exc.os_error, "errno", None) == errno.ECONNREFUSED:
                raise ProbeError("/metrics: connection refused (not listening: loading or stopped)", code="refused") from None
            raise ProbeError(f"/metrics: {exc}", code="connection") from None
        except aiohttp.ClientError as exc:
            raise ProbeError(f"/metrics: {type(exc).__name__}: {exc}", code="connection") from None

    async def _read_capped(self, resp: aiohttp.ClientResponse) -> bytes:
        if resp.content_length is not None and resp.content_length > self._max_bytes:
            resp.close()
            raise ProbeError(f"/metrics announces {resp.content_length} bytes, over {self._max_bytes}", code="too_large")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self._max_bytes:
                resp.close()  # drop the connection: the rest of the body is not worth reading
                raise ProbeError(f"/metrics is over {self._max_bytes} bytes", code="too_large")
            chunks.append(chunk)
        return b"".join(chunks)
