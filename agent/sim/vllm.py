"""FakeVllm: a real aiohttp server on loopback that behaves like vLLM's OpenAI server
(/health, /v1/models, /metrics, completions), with fault injection for tests and
a deterministic traffic simulation for the demo.

/metrics is rendered by prometheus_client, the library vLLM itself uses, from
vLLM's own metric definitions (names, HELP, labels, bucket boundaries), so it
carries the real format's quirks: `_created` samples, label order, `engine`
labels per data-parallel rank.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import random
import time
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from aiohttp import web
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from agent.sim.completions import CONTENT_TYPE, CompletionStream, completion_json
from agent.sim.vllm_buckets import E2E_BUCKETS, TPOT_BUCKETS, TTFT_BUCKETS

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Fault(StrEnum):
    OK = "ok"
    HANG = "hang"  # never answers until stop() / refuse()
    SLOW = "slow"  # answers after delay_s
    GARBAGE = "garbage"  # 200 with a binary body
    TRUNCATED = "truncated"  # 200 with the exposition cut mid-line
    OVERSIZED = "oversized"  # 200 streaming oversized_bytes of text
    HTTP_500 = "http_500"
    HTTP_503 = "http_503"


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass(frozen=True, slots=True)
class ServedMetrics:
    """What one /metrics answer said, with how many requests had arrived by then
    (the demo reconciles the agent's drain report against it)."""

    at_mono: float
    arrived_total: int
    in_flight: int


class _VllmMetrics:
    """vLLM's families on a private registry; V1 (model_name + engine) or V0 (model_name)."""

    def __init__(
        self, model: str, engines: int, metric_names: str, buckets: dict[str, tuple[float, ...]], cache_info: dict[str, str]
    ) -> None:
        v1 = metric_names == "v1"
        lab = ["model_name", "engine"] if v1 else ["model_name"]
        r = self.registry = CollectorRegistry()
        self.series = [(model, str(e)) if v1 else (model,) for e in range(engines)]
        self.running = Gauge("vllm:num_requests_running", "Number of requests in model execution batches.", lab, registry=r)
        self.waiting = Gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.", lab, registry=r)
        kv_name = "vllm:kv_cache_usage_perc" if v1 else "vllm:gpu_cache_usage_perc"
        self.kv = Gauge(kv_name, "KV-cache usage. 1 means 100 percent usage.", lab, registry=r)
        self.prompt = Counter("vllm:prompt_tokens", "Number of prefill tokens processed.", lab, registry=r)
        self.generation = Counter("vllm:generation_tokens", "Number of generation tokens processed.", lab, registry=r)
        self.success = Counter(
            "vllm:request_success", "Count of successfully processed requests.", [*lab, "finished_reason"], registry=r
        )
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds.",
            lab,
            buckets=buckets["ttft"],
            registry=r,
        )
        tpot_name = "vllm:inter_token_latency_seconds" if v1 else "vllm:time_per_output_token_seconds"
        self.tpot = Histogram(tpot_name, "Histogram of inter-token latency in seconds.", lab, buckets=buckets["tpot"], registry=r)
        self.request_tpot = (
            Histogram(
                "vllm:request_time_per_output_token_seconds",
                "Histogram of time_per_output_token_seconds per request.",
                lab,
                buckets=buckets["tpot"],
                registry=r,
            )
            if v1
            else None
        )
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "Histogram of e2e request latency in seconds.",
            lab,
            buckets=buckets["e2e"],
            registry=r,
        )
        self.sleep = (
            Gauge(
                "vllm:engine_sleep_state",
                "Engine sleep state; awake = 0 means engine is sleeping.",
                [*lab, "sleep_state"],
                registry=r,
            )
            if v1
            else None
        )
        # Current V1 only: why requests wait, engine health, time in the queue.
        self.waiting_by_reason = (
            Gauge("vllm:num_requests_waiting_by_reason", "Number of requests waiting, by reason.", [*lab, "reason"], registry=r)
            if v1
            else None
        )
        self.healthy = Gauge("vllm:engine_healthy", "1 if the engine is healthy.", lab, registry=r) if v1 else None
        self.queue_time = (
            Histogram(
                "vllm:request_queue_time_seconds",
                "Histogram of time spent in WAITING phase for request.",
                lab,
                buckets=buckets["e2e"],
                registry=r,
            )
            if v1
            else None
        )
        info = Gauge(
            "vllm:cache_config_info",
            "Information of the LLMEngine CacheConfig",
            [*cache_info, *(["engine"] if v1 else [])],
            registry=r,
        )
        for e in range(engines):
            info.labels(**cache_info, **({"engine": str(e)} if v1 else {})).set(1)
            # vLLM creates every per-engine child up front, so a fresh server serves zeros, not nothing.
            for metric in (self.prompt, self.generation, self.ttft, self.tpot, self.request_tpot, self.e2e, self.queue_time):
                if metric is not None:
                    metric.labels(*self.series[e])
            for reason in ("stop", "length", "abort"):
                self.success.labels(*self.series[e], reason)

    def observe(
        self, engine: int, prompt: int, output: int, ttft_s: float, tpot_s: float, reason: str, queue_s: float = 0.0
    ) -> None:
        key = self.series[engine]
        if self.queue_time is not None:
            self.queue_time.labels(*key).observe(queue_s)
        self.prompt.labels(*key).inc(prompt)
        self.generation.labels(*key).inc(output)
        self.ttft.labels(*key).observe(ttft_s)
        for _ in range(max(0, output - 1)):
            self.tpot.labels(*key).observe(tpot_s)
        if self.request_tpot is not None and output > 1:
            self.request_tpot.labels(*key).observe(tpot_s)
        self.e2e.labels(*key).observe(ttft_s + tpot_s * max(0, output - 1))
        self.success.labels(*key, reason).inc()


@dataclass
class TrafficPattern:
    """Diurnal-ish ramp (one cosine period) plus one burst; deterministic for a seed."""

    seed: int = 0
    base_rps: float = 1.0  # per engine-sized node: one engine serves about 8 rps at the defaults
    peak_rps: float = 6.0
    period_s: float = 60.0
    burst_start_s: float = 25.0
    burst_s: float = 6.0
    burst_rps: float = 12.0
    max_num_seqs: int = 32  # per engine; more waits in the queue
    prefill_tokens_per_s: float = 6000.0
    base_tpot_s: float = 0.02  # grows with the batch size
    mean_prompt_tokens: int = 400
    mean_output_tokens: int = 120
    rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def rate_rps(self, t: float) -> float:
        wave = (1 - math.cos(2 * math.pi * t / self.period_s)) / 2
        burst = self.burst_rps if self.burst_start_s <= t % self.period_s < self.burst_start_s + self.burst_s else 0.0
        return self.base_rps + (self.peak_rps - self.base_rps) * wave + burst

    def arrivals(self, t: float, dt: float) -> int:
        lam, k, p = self.rate_rps(t) * dt, 0, 1.0  # Knuth's Poisson draw; lam stays small per step
        limit = math.exp(-lam)
        while True:
            p *= self.rng.random()
            if p <= limit:
                return k
            k += 1


@dataclass
class _Seq:
    arrived_s: float
    prompt: int
    output: int
    first_token_s: float | None = None
    generated: float = 0.0


class FakeVllm:
    """Controls are plain attributes: running/waiting/kv_cache_usage (one entry per
    engine), health_status, health_fault/metrics_fault, delay_s, ttft_s, tpot_s,
    shutdown_timeout_s (how long stop() lets requests in progress finish: vLLM's
    --shutdown-timeout, whose default 0 aborts them at once)."""

    def __init__(
        self,
        *,
        model: str = "fake/llama-3-8b",
        engines: int = 1,
        metric_names: str = "v1",
        host: str = "127.0.0.1",
        buckets: dict[str, tuple[float, ...]] | None = None,
        num_gpu_blocks: int = 27648,
        block_size: int = 16,
        kv_cache_memory_bytes: int | None = None,
        traffic: TrafficPattern | None = None,
    ) -> None:
        if metric_names not in ("v1", "v0") or (metric_names == "v0" and engines != 1):
            raise ValueError("metric_names is v1 or v0, and V0 has a single engine")
        self.model, self.engines, self.metric_names, self.host = model, engines, metric_names, host
        self.buckets = {"ttft": TTFT_BUCKETS, "tpot": TPOT_BUCKETS, "e2e": E2E_BUCKETS, **(buckets or {})}
        self.cache_info = {
            "block_size": str(block_size),
            "cache_dtype": "auto",
            "gpu_memory_utilization": "0.9",
            "kv_cache_memory_bytes": str(kv_cache_memory_bytes),
            "num_gpu_blocks": str(num_gpu_blocks),
        }
        self.running, self.waiting, self.kv_cache_usage = [0] * engines, [0] * engines, [0.0] * engines
        self.deferred = [0] * engines  # of the waiting, how many wait on a KV transfer / LoRA budget
        self.engine_healthy = [True] * engines
        self.health_status = 200
        self.health_fault = Fault.OK
        self.metrics_fault = Fault.OK
        self.delay_s = 5.0
        self.shutdown_timeout_s = 0.5
        self.oversized_bytes = 16 * 1024 * 1024
        self.extra_metrics = b""  # appended to every /metrics body (label explosions in tests)
        self.ttft_s, self.tpot_s, self.completion_tokens = 0.02, 0.002, 16
        self.sleeping = False
        self.requests: deque[RecordedRequest] = deque(maxlen=10_000)
        self.arrived_total = 0  # requests that reached the server (simulated or real completions)
        self.served_metrics: deque[ServedMetrics] = deque(maxlen=10_000)
        self.traffic = traffic or TrafficPattern()
        self.port = 0
        self._served = [0] * engines
        self._next_engine = 0
        self._runner: web.AppRunner | None = None
        self._released = asyncio.Event()
        self._sim_t = 0.0
        self._queues: list[deque[Any]] = [deque() for _ in range(engines)]
        self._active: list[list[Any]] = [[] for _ in range(engines)]
        self._metrics = self._new_metrics()

    # --- lifecycle -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, port: int = 0) -> None:
        app = web.Application(middlewares=[self._log_middleware])
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._completions)
        self._released = asyncio.Event()
        # aiohttp reads a shutdown timeout of 0 as "wait for ever": the smallest positive one aborts.
        runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=max(self.shutdown_timeout_s, 0.001), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, port or self.port, reuse_address=True)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop listening and drop every connection; hung handlers are let go."""
        self._released.set()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()

    async def refuse(self) -> None:
        """Like vLLM loading a model: the port is not listening, connects are refused."""
        await self.stop()

    async def accept(self) -> None:
        """Listen again on the same port."""
        if self._runner is None:
            await self.start(self.port)

    # --- controls --------------------------------------------------------------------
    def set_fault(self, fault: Fault | str, target: str = "both") -> None:
        if target in ("health", "both"):
            self.health_fault = Fault(fault)
        if target in ("metrics", "both"):
            self.metrics_fault = Fault(fault)

    def set_load(self, running: int, waiting: int = 0, engine: int = 0) -> None:
        self.running[engine], self.waiting[engine] = running, waiting

    @property
    def in_flight(self) -> int:
        return sum(self.running) + sum(self.waiting) + sum(self._served)

    def finish(self, n: int) -> int:
        """Move n in-flight requests (running first) to request_success{finished_reason="stop"}."""
        return self._retire(n, "stop")

    def abort(self, n: int) -> int:
        return self._retire(n, "abort")

    def restart(self) -> None:
        """A restarted vLLM: every counter and histogram starts again from zero, nothing in flight."""
        self.running, self.waiting = [0] * self.engines, [0] * self.engines
        self._queues, self._active = [deque() for _ in range(self.engines)], [[] for _ in range(self.engines)]
        self._metrics = self._new_metrics()

    def observe_request(
        self,
        engine: int = 0,
        prompt_tokens: int = 32,
        output_tokens: int = 16,
        ttft_s: float | None = None,
        tpot_s: float | None = None,
        reason: str = "stop",
        queue_s: float = 0.0,
    ) -> None:
        """Record one finished request in the counters and histograms."""
        ttft = self.ttft_s if ttft_s is None else ttft_s
        tpot = self.tpot_s if tpot_s is None else tpot_s
        self._metrics.observe(engine, prompt_tokens, output_tokens, ttft, tpot, reason, queue_s)

    def render_metrics(self) -> bytes:
        m = self._metrics
        for e, key in enumerate(m.series):
            m.running.labels(*key).set(self.running[e] + self._served[e])
            m.waiting.labels(*key).set(self.waiting[e])
            m.kv.labels(*key).set(self.kv_cache_usage[e])
            if m.sleep is not None:
                for state, value in (
                    ("awake", 0 if self.sleeping else 1),
                    ("weights_offloaded", 1 if self.sleeping else 0),
                    ("discard_all", 0),
                ):
                    m.sleep.labels(*key, state).set(value)
            if m.waiting_by_reason is not None and m.healthy is not None:
                deferred = min(self.deferred[e], self.waiting[e])
                m.waiting_by_reason.labels(*key, "capacity").set(self.waiting[e] - deferred)
                m.waiting_by_reason.labels(*key, "deferred").set(deferred)
                m.healthy.labels(*key).set(1 if self.engine_healthy[e] else 0)
        in_flight = sum(self.running) + sum(self.waiting) + sum(self._served)
        self.served_metrics.append(ServedMetrics(time.monotonic(), self.arrived_total, in_flight))
        return generate_latest(m.registry)

    def _new_metrics(self) -> _VllmMetrics:
        return _VllmMetrics(self.model, self.engines, self.metric_names, self.buckets, self.cache_info)

    def _retire(self, n: int, reason: str) -> int:
        done = 0
        for queue in (self.running, self.waiting):
            for e in range(self.engines):
                while done < n and queue[e] > 0:
                    queue[e] -= 1
                    done += 1
                    if reason == "abort":
                        self._metrics.success.labels(*self._metrics.series[e], reason).inc()
                    else:
                        self.observe_request(e, reason=reason)
        return done

    # --- traffic simulation (demo) ---------------------------------------------------
    def simulate_step(self, dt: float) -> None:
        """Advance the simulated engines by dt seconds of traffic from `self.traffic`.

        While used, it owns running/waiting/kv_cache_usage. Arrivals go to the
        least-loaded engine, wait for a batch slot, pay prefill, then decode at a
        per-token time that grows with the batch; finished requests feed the
        counters and histograms like vLLM's.
        """
        p = self.traffic
        for _ in range(p.arrivals(self._sim_t, dt)):
            self.arrived_total += 1
            e = min(range(self.engines), key=lambda i: len(self._queues[i]) + len(self._active[i]))
            prompt = max(1, int(p.rng.expovariate(1 / p.mean_prompt_tokens)))
            self._queues[e].append(_Seq(self._sim_t, prompt, max(2, int(p.rng.expovariate(1 / p.mean_output_tokens)))))
        self._sim_t += dt
        for e in range(self.engines):
            self._step_engine(e, dt)

    def _step_engine(self, e: int, dt: float) -> None:
        p, queue, active = self.traffic, self._queues[e], self._active[e]
        while queue and len(active) < p.max_num_seqs:
            seq = queue.popleft()
            seq.first_token_s = self._sim_t + seq.prompt / p.prefill_tokens_per_s
            active.append(seq)
        tpot = p.base_tpot_s * (1 + len(active) / p.max_num_seqs)
        for seq in list(active):
            assert seq.first_token_s is not None
            seq.generated += max(0.0, min(dt, self._sim_t - seq.first_token_s)) / tpot
            if seq.generated >= seq.output - 1 and self._sim_t >= seq.first_token_s:
                active.remove(seq)
                self.observe_request(
                    e,
                    seq.prompt,
                    seq.output,
                    seq.first_token_s - seq.arrived_s,
                    tpot,
                    "stop" if p.rng.random() < 0.8 else "length",
                )
        self.running[e], self.waiting[e] = len(active), len(queue)
        capacity = float(self.cache_info["num_gpu_blocks"]) * float(self.cache_info["block_size"])
        self.kv_cache_usage[e] = min(1.0, sum(s.prompt + s.generated for s in active) / capacity * 20)

    # --- handlers --------------------------------------------------------------------
    @web.middleware
    async def _log_middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        self.requests.append(RecordedRequest(request.method, request.path, dict(request.headers)))
        return await handler(request)

    async def _health(self, request: web.Request) -> web.StreamResponse:
        return await self._faulted(request, self.health_fault, lambda: b"", self.health_status)

    async def _metrics_handler(self, request: web.Request) -> web.StreamResponse:
        return await self._faulted(request, self.metrics_fault, lambda: self.render_metrics() + self.extra_metrics, 200)

    async def _models(self, request: web.Request) -> web.Response:
        card = {
            "id": self.model,
            "object": "model",
            "created": int(time.time()),
            "owned_by": "vllm",
            "root": self.model,
            "parent": None,
            "max_model_len": 8192,
            "permission": [],
        }
        return web.json_response({"object": "list", "data": [card]})

    async def _faulted(self, request: web.Request, fault: Fault, body: Any, status: int) -> web.StreamResponse:
        if fault is Fault.HANG:
            await self._released.wait()
            raise web.HTTPServiceUnavailable()
        if fault is Fault.SLOW:
            with contextlib.suppress(TimeoutError):  # stop() cuts the delay short
                async with asyncio.timeout(self.delay_s):
                    await self._released.wait()
        elif fault in (Fault.HTTP_500, Fault.HTTP_503):
            return web.Response(
                status=int(fault.value[5:]), text="Internal Server Error" if fault is Fault.HTTP_500 else "Service Unavailable"
            )
        elif fault is Fault.GARBAGE:
            return web.Response(
                body=b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe garbage", content_type="application/octet-stream"
            )
        elif fault is Fault.OVERSIZED:
            return await self._oversized(request)
        text = body()
        if fault is Fault.TRUNCATED:
            text = text[: text.rfind(b"\n", 0, len(text) // 2) + 40]  # cut 40 bytes into a line
            text = text.rstrip(b"\n")
        return web.Response(status=status, body=text, headers={"Content-Type": METRICS_CONTENT_TYPE} if text else None)

    async def _oversized(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": METRICS_CONTENT_TYPE})
        await response.prepare(request)
        line = b'vllm:num_requests_running{engine="0",model_name="padding"} 0.0\n' * 1024
        try:
            for _ in range(self.oversized_bytes // len(line) + 1):
                await response.write(line)
            await response.write_eof()
        except ConnectionError:
            pass  # the client stopped reading at its cap: what the test wants
        return response

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except json.JSONDecodeError:
            return _error(400, "BadRequestError", "request body is not JSON")
        if body.get("model", self.model) != self.model:
            return _error(404, "NotFoundError", f"The model `{body.get('model')}` does not exist.")
        max_tokens = int(body.get("max_tokens") or body.get("max_completion_tokens") or 16)
        tokens = max(1, min(max_tokens, self.completion_tokens))
        prompt = body.get("prompt") or " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        prompt_tokens = max(1, len(str(prompt).split()))
        engine, self._next_engine = self._next_engine, (self._next_engine + 1) % self.engines
        self.arrived_total += 1
        reason = "length" if tokens == max_tokens else "stop"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            stream = CompletionStream(request.path, self.model, prompt_tokens, include_usage=include_usage)
            return await self._stream(request, stream, engine, tokens, reason)
        self._served[engine] += 1
        try:
            await asyncio.sleep(self.ttft_s + self.tpot_s * (tokens - 1))
        finally:
            self._served[engine] -= 1
        self.observe_request(engine, prompt_tokens, tokens, reason=reason)
        return web.json_response(completion_json(request.path, self.model, "ok " * tokens, reason, prompt_tokens, tokens))

    async def _stream(
        self, request: web.Request, stream: CompletionStream, engine: int, tokens: int, reason: str
    ) -> web.StreamResponse:
        """One SSE chunk per token (the first after ttft_s, then one every tpot_s); the
        request counts as running until its last token, and as aborted if the client goes."""
        response = web.StreamResponse(headers={"Content-Type": CONTENT_TYPE, "Cache-Control": "no-cache"})
        self._served[engine] += 1
        try:
            await response.prepare(request)
            for chunk in stream.opening():
                await response.write(chunk)
            for i in range(tokens):
                await asyncio.sleep(self.ttft_s if i == 0 else self.tpot_s)
                await response.write(stream.token("ok ", reason if i == tokens - 1 else None))
        except ConnectionError:
            self._metrics.success.labels(*self._metrics.series[engine], "abort").inc()
            return response
        finally:
            self._served[engine] -= 1
        self.observe_request(engine, stream.prompt_tokens, tokens, reason=reason)
        with contextlib.suppress(ConnectionError):  # gone after its last token: still a success
            for chunk in stream.closing(tokens):
                await response.write(chunk)
            await response.write_eof()
        return response


def _error(status: int, kind: str, message: str) -> web.Response:
    return web.json_response({"object": "error", "message": message, "type": kind, "param": None, "code": status}, status=status)


if __name__ == "__main__":  # python -m agent.sim.vllm: the fake on its own, to try the agent by hand
    from agent.sim.launcher import vllm_main

    raise SystemExit(vllm_main())
