"""The vLLM metrics probe (`VllmMetricsProbe`): fetches /metrics with a size cap and a
deadline, feeds the sliding window and returns a `VllmReading`; KV capacity rules."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.core.snapshot import Key
from probes.base import FailureCode, ProbeError
from probes.offloop_http import OffLoopGet
from probes.prom_text import ExpositionTooLarge, PromParseError, PromParser, decode
from probes.vllm_metrics import (
    CACHE_INFO,
    SAMPLE_NAMES,
    InvalidScrape,
    ScrapeAccumulator,
    VllmScrape,
    VllmWindow,
    WindowStats,
)

log = logging.getLogger(__name__)

_BATCH_LINES = 25  # 0.03-0.1 ms of parsing and aggregating on this kind of machine between two yields


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
    # Newer vLLM (each None / empty where the server does not serve it):
    queue_waiting: float | None = None  # what the autoscalers see: waiting for capacity (else all waiting)
    waiting_deferred: float | None = None  # waiting on a KV transfer or a LoRA budget: not demand
    engines_unhealthy: int | None = None  # engines with vllm:engine_healthy 0
    queue_time_s: dict[str, float | None] = field(default_factory=dict)  # vllm:request_queue_time_seconds
    requests_failed_total: float = 0.0  # finished_reason="error": failed, neither completed nor aborted
    # vllm:generation_tokens_total as served (summed over engines); None when not served.
    generation_tokens_total: float | None = None


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
    aborted, failed = finished.get("abort", 0.0), finished.get("error", 0.0)
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
        requests_completed_total=sum(finished.values()) - aborted - failed,
        requests_aborted_total=aborted,
        window_s=stats.window_s,
        engines=scrape.engines,
        models=scrape.models,
        metric_names=scrape.metric_names,
        engine_sleeping=scrape.engine_sleeping,
        notes=stats.notes,
        queue_waiting=scrape.queue_waiting,
        waiting_deferred=scrape.waiting_by_reason.get("deferred"),
        engines_unhealthy=scrape.engines_unhealthy,
        queue_time_s=stats.queue_time_s,
        requests_failed_total=failed,
        generation_tokens_total=scrape.generation_tokens_total,
    )


VLLM: Key[VllmReading] = Key("vllm")


class VllmMetricsProbe:
    """Probe "vllm": GET /metrics under the client's base URL with a size cap and a
    deadline, sent and read off the event loop (probes.offloop_http says why), then
    summarize + window. A failed scrape raises ProbeError and leaves the window as it was.

    Codes: refused (not listening: loading or gone; a drain counts that as empty),
    timeout, http_<status>, too_large (bytes, lines or one line over its cap),
    connection, garbage (not an exposition), invalid (impossible numbers).
    """

    name = VLLM

    def __init__(
        self,
        client: OffLoopGet,
        *,
        interval_s: float = 1.0,
        timeout_s: float = 3.0,
        max_bytes: int = 8 * 1024 * 1024,
        max_lines: int = 20_000,
        slo_ttft_ms: float = 2000.0,
        slo_tpot_ms: float = 100.0,
        window_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
        kv_cache_capacity_bytes: float | None = None,
        kv_cache_bytes_per_token: float | None = None,
    ) -> None:
        self._client = client
        self.interval_s = interval_s
        # The runner's deadline sits above ours so a slow vLLM gets our "timeout" code and message.
        self.timeout_s = timeout_s + 1.0
        self._call_timeout_s = timeout_s
        self._max_bytes = max_bytes
        self._max_lines = max_lines
        self._slo_ttft_s = slo_ttft_ms / 1000.0
        self._slo_tpot_s = slo_tpot_ms / 1000.0
        self._clock = clock
        self._capacity = {"configured_bytes": kv_cache_capacity_bytes, "bytes_per_token": kv_cache_bytes_per_token}
        self._parser = PromParser()
        self.window = VllmWindow(window_s)

    async def sample(self) -> VllmReading:
        body = await self._fetch()
        taken_at = self._clock()
        scrape = await self._summarize(body)
        await asyncio.sleep(0)  # each step a fraction of a millisecond: /readyz answers in between
        if self.window.add(taken_at, scrape):
            log.info("vLLM counters went backwards or its engines changed: restarted? the rate window starts again")
        stats = self.window.derive(self._slo_ttft_s, self._slo_tpot_s)
        await asyncio.sleep(0)
        return make_reading(scrape, stats, kv_capacity(scrape, **self._capacity))

    async def _summarize(self, body: bytes) -> VllmScrape:
        """Parse and aggregate a few hundred lines at a time, yielding to the event loop
        between batches: /readyz must answer while a big exposition is read. The total
        work is bounded by the line cap, checked before anything is parsed."""
        lines = body.count(b"\n")
        if lines > self._max_lines:
            why = f"/metrics has {lines} lines, over inference.metrics_max_lines ({self._max_lines}): dropped"
            raise ProbeError(why, code=FailureCode.TOO_LARGE)
        acc = ScrapeAccumulator()
        try:
            text = decode(body)
            for batch in self._parser.batches(text, _BATCH_LINES, names=SAMPLE_NAMES):
                acc.feed(batch)
                await asyncio.sleep(0)
            while acc.merge_next():
                await asyncio.sleep(0)
            return acc.finish()
        except ExpositionTooLarge as exc:
            raise ProbeError(f"/metrics is not something to parse: {exc}", code=FailureCode.TOO_LARGE) from None
        except InvalidScrape as exc:
            raise ProbeError(f"/metrics reports impossible values, scrape dropped: {exc}", code=FailureCode.INVALID) from None
        except PromParseError as exc:
            raise ProbeError(f"/metrics is not a usable vLLM exposition: {exc}", code=FailureCode.GARBAGE) from None

    async def _fetch(self) -> bytes:
        # identity: gzip on loopback only costs CPU on both ends, and the cap must count real bytes.
        headers = {"Accept": "text/plain;version=0.0.4", "Accept-Encoding": "identity"}
        return await self._client.get(
            "/metrics", what="/metrics", timeout_s=self._call_timeout_s, max_bytes=self._max_bytes, headers=headers
        )
