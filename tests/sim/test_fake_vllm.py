"""FakeVllm speaks vLLM's protocol: /health, /v1/models, /metrics in the real format,
completions, faults, refusing and accepting on the same port, and a deterministic
traffic simulation."""

from __future__ import annotations

import asyncio
import errno
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.sim.vllm import E2E_BUCKETS, TTFT_BUCKETS, FakeVllm, Fault, TrafficPattern
from tests.harness import until


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVllm]:
    fake = FakeVllm(engines=2)
    await fake.start()
    yield fake
    await fake.stop()


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


async def families(session: aiohttp.ClientSession, fake: FakeVllm) -> dict[str, list]:
    status, body = await get(session, f"{fake.url}/metrics")
    assert status == 200
    return {f.name: f.samples for f in text_string_to_metric_families(body.decode())}


def total(fams: dict[str, list], family: str, suffix: str = "", **labels: str) -> float:
    """The sum of a family's samples whose name ends in `suffix` and that carry `labels`
    (every engine's, every label value's not named)."""
    return sum(s.value for s in fams[family] if s.name.endswith(suffix) and all(s.labels.get(k) == v for k, v in labels.items()))


def value(samples: list, **labels: str) -> float:
    (match,) = [s.value for s in samples if all(s.labels.get(k) == v for k, v in labels.items())]
    return match


async def test_health_is_200_with_an_empty_body_then_the_configured_status(
    vllm: FakeVllm, session: aiohttp.ClientSession
) -> None:
    assert await get(session, f"{vllm.url}/health") == (200, b"")
    vllm.health_status = 503
    assert (await get(session, f"{vllm.url}/health"))[0] == 503


async def test_models_is_an_openai_model_list(vllm: FakeVllm, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{vllm.url}/v1/models") as resp:
        body = await resp.json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["fake/llama-3-8b"]
    assert body["data"][0]["owned_by"] == "vllm"


async def test_metrics_are_real_v1_exposition_with_engine_labels_created_and_vllm_buckets(
    vllm: FakeVllm, session: aiohttp.ClientSession
) -> None:
    vllm.set_load(running=5, waiting=1, engine=1)
    async with session.get(f"{vllm.url}/metrics") as resp:
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    fams = await families(session, vllm)
    running = fams["vllm:num_requests_running"]
    assert {s.labels["engine"] for s in running} == {"0", "1"}
    assert value(running, engine="1") == 5 and value(fams["vllm:num_requests_waiting"], engine="1") == 1
    assert "vllm:prompt_tokens_created" in fams and "vllm:time_to_first_token_seconds_created" in fams
    ttft_bounds = [
        s.labels["le"]
        for s in fams["vllm:time_to_first_token_seconds"]
        if s.name.endswith("_bucket") and s.labels["engine"] == "0"
    ]
    assert ttft_bounds == [*map(str, TTFT_BUCKETS), "+Inf"]
    info = fams["vllm:cache_config_info"]
    assert {s.labels["engine"] for s in info} == {"0", "1"} and info[0].labels["num_gpu_blocks"] == "27648"
    assert value(fams["vllm:engine_sleep_state"], engine="0", sleep_state="awake") == 1
    assert "vllm:inter_token_latency_seconds" in fams and "vllm:kv_cache_usage_perc" in fams


async def test_v0_metrics_use_the_old_names_and_no_engine_label(session: aiohttp.ClientSession) -> None:
    fake = FakeVllm(metric_names="v0")
    await fake.start()
    try:
        fams = await families(session, fake)
    finally:
        await fake.stop()
    assert "vllm:gpu_cache_usage_perc" in fams and "vllm:time_per_output_token_seconds" in fams
    assert "vllm:kv_cache_usage_perc" not in fams and "vllm:inter_token_latency_seconds" not in fams
    assert "engine" not in fams["vllm:num_requests_running"][0].labels


async def test_custom_buckets_are_served_as_configured(session: aiohttp.ClientSession) -> None:
    fake = FakeVllm(buckets={"e2e": (0.5, 5.0)})
    await fake.start()
    try:
        fams = await families(session, fake)
    finally:
        await fake.stop()
    bounds = [s.labels["le"] for s in fams["vllm:e2e_request_latency_seconds"] if s.name.endswith("_bucket")]
    assert bounds == ["0.5", "5.0", "+Inf"] and bounds != [*map(str, E2E_BUCKETS), "+Inf"]


async def test_completion_counts_as_running_while_served_then_feeds_the_metrics(
    vllm: FakeVllm, session: aiohttp.ClientSession
) -> None:
    vllm.ttft_s, vllm.tpot_s = 0.2, 0.01
    request = asyncio.create_task(
        session.post(f"{vllm.url}/v1/completions", json={"model": vllm.model, "prompt": "one two three", "max_tokens": 50})
    )

    async def running() -> float:
        fams = await families(session, vllm)
        return total(fams, "vllm:num_requests_running")

    await until(running, 2, what="the completion to count as running")
    resp = await request
    body = await resp.json()
    assert resp.status == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] == "stop" and body["usage"] == {
        "prompt_tokens": 3,
        "completion_tokens": 16,
        "total_tokens": 19,
    }
    fams = await families(session, vllm)
    assert total(fams, "vllm:num_requests_running") == 0
    assert total(fams, "vllm:generation_tokens", "_total") == 16
    assert total(fams, "vllm:request_success", "_total", finished_reason="stop") == 1
    assert total(fams, "vllm:inter_token_latency_seconds", "_count") == 15


async def test_chat_completion_is_openai_shaped_and_an_unknown_model_is_404(
    vllm: FakeVllm, session: aiohttp.ClientSession
) -> None:
    vllm.ttft_s = vllm.tpot_s = 0.0
    async with session.post(
        f"{vllm.url}/v1/chat/completions",
        json={"model": vllm.model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    ) as resp:
        body = await resp.json()
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["role"] == "assistant"
    assert body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 4
    async with session.post(f"{vllm.url}/v1/chat/completions", json={"model": "other", "messages": []}) as resp:
        assert resp.status == 404 and (await resp.json())["type"] == "NotFoundError"


async def sse_events(resp: aiohttp.ClientResponse) -> list[bytes]:
    """The `data:` payloads of a server-sent event stream, in order."""
    events = []
    async for line in resp.content:
        if line.startswith(b"data: "):
            events.append(line[len(b"data: ") :].rstrip(b"\n"))
        else:
            assert line == b"\n"  # every event is one data line and a blank line
    return events


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/completions", {"prompt": "one two three"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "one two three"}]}),
    ],
)
async def test_streamed_completion_sends_one_chunk_per_token_paced_counts_as_running_then_done(
    vllm: FakeVllm, session: aiohttp.ClientSession, path: str, body: dict
) -> None:
    vllm.ttft_s, vllm.tpot_s, vllm.completion_tokens = 0.2, 0.02, 5
    loop = asyncio.get_running_loop()
    started = loop.time()
    request = {"model": vllm.model, "max_tokens": 50, "stream": True, "stream_options": {"include_usage": True}, **body}
    async with session.post(f"{vllm.url}{path}", json=request) as resp:
        assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/event-stream")
        assert total(await families(session, vllm), "vllm:num_requests_running") == 1
        events = await sse_events(resp)
    assert loop.time() - started >= 0.2 + 4 * 0.02
    assert events[-1] == b"[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    chat = path.endswith("/chat/completions")
    assert {c["object"] for c in chunks} == {"chat.completion.chunk" if chat else "text_completion"} and len(
        {c["id"] for c in chunks}
    ) == 1
    *tokens, usage = chunks
    if chat:
        assert tokens.pop(0)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    texts = [c["choices"][0]["delta"]["content"] if chat else c["choices"][0]["text"] for c in tokens]
    assert texts == ["ok "] * 5
    assert [c["choices"][0]["finish_reason"] for c in tokens] == [None] * 4 + ["stop"]
    assert usage["choices"] == [] and usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    fams = await families(session, vllm)
    assert total(fams, "vllm:num_requests_running") == 0
    assert total(fams, "vllm:request_success", "_total", finished_reason="stop") == 1
    assert total(fams, "vllm:generation_tokens", "_total") == 5


async def test_streamed_completion_without_usage_option_ends_with_done_after_the_last_token(
    vllm: FakeVllm, session: aiohttp.ClientSession
) -> None:
    vllm.ttft_s = vllm.tpot_s = 0.0
    async with session.post(
        f"{vllm.url}/v1/completions", json={"model": vllm.model, "prompt": "hi", "max_tokens": 3, "stream": True}
    ) as resp:
        events = await sse_events(resp)
    assert len(events) == 4 and events[-1] == b"[DONE]"
    assert json.loads(events[-2])["choices"][0]["finish_reason"] == "length"


async def test_a_client_leaving_a_stream_counts_as_an_abort(vllm: FakeVllm, session: aiohttp.ClientSession) -> None:
    vllm.ttft_s, vllm.tpot_s, vllm.completion_tokens = 0.0, 0.05, 200
    async with session.post(
        f"{vllm.url}/v1/completions", json={"model": vllm.model, "prompt": "hi", "stream": True, "max_tokens": 500}
    ) as resp:
        await resp.content.readline()
        resp.close()  # drop the connection mid-stream

    async def aborted() -> bool:
        fams = await families(session, vllm)
        return total(fams, "vllm:request_success", "_total", finished_reason="abort") == 1

    await until(aborted, 5, what="the stream to count as aborted")
    assert vllm.in_flight == 0


@pytest.mark.parametrize("streamed", [False, True])
async def test_stop_with_no_shutdown_timeout_aborts_what_is_in_flight_like_vllm_by_default(
    vllm: FakeVllm, session: aiohttp.ClientSession, streamed: bool
) -> None:
    vllm.ttft_s, vllm.shutdown_timeout_s = 0.0, 0.0
    vllm.tpot_s = 0.1  # 1.5 s per completion
    await vllm.stop()
    await vllm.start(vllm.port)  # the timeout is the server's, read at start

    async def complete() -> None:
        async with session.post(
            f"{vllm.url}/v1/completions", json={"model": vllm.model, "prompt": "hi", "stream": streamed}
        ) as resp:
            await resp.read()

    request = asyncio.create_task(complete())
    await until(lambda: vllm.in_flight == 1, 2, what="the completion in flight")
    await vllm.stop()
    with pytest.raises(aiohttp.ClientError):
        await request


async def test_stop_lets_a_short_request_finish_within_the_default_shutdown_timeout(
    vllm: FakeVllm, session: aiohttp.ClientSession
) -> None:
    vllm.ttft_s, vllm.tpot_s = 0.1, 0.01
    request = asyncio.create_task(session.post(f"{vllm.url}/v1/completions", json={"model": vllm.model, "prompt": "hi"}))
    await until(lambda: vllm.in_flight == 1, 2, what="the completion in flight")
    await vllm.stop()
    resp = await request
    assert resp.status == 200 and (await resp.json())["object"] == "text_completion"


@pytest.mark.parametrize("target", ["health", "metrics"])
@pytest.mark.parametrize(("fault", "status"), [(Fault.HTTP_500, 500), (Fault.HTTP_503, 503), (Fault.GARBAGE, 200)])
async def test_status_faults_apply_to_their_endpoint_only(
    vllm: FakeVllm, session: aiohttp.ClientSession, target: str, fault: Fault, status: int
) -> None:
    vllm.set_fault(fault, target)
    other = "metrics" if target == "health" else "health"
    faulted, body = await get(session, f"{vllm.url}/{target}")
    assert faulted == status and (fault is not Fault.GARBAGE or body.startswith(b"\x89PNG"))
    assert (await get(session, f"{vllm.url}/{other}"))[0] == 200


async def test_hang_never_answers_and_slow_answers_after_the_delay(vllm: FakeVllm, session: aiohttp.ClientSession) -> None:
    vllm.set_fault(Fault.HANG)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.3):
            await get(session, f"{vllm.url}/health")
    vllm.set_fault(Fault.SLOW)
    vllm.delay_s = 0.2
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert (await get(session, f"{vllm.url}/metrics"))[0] == 200
    assert loop.time() - started >= 0.2


async def test_truncated_and_oversized_metrics_bodies(vllm: FakeVllm, session: aiohttp.ClientSession) -> None:
    vllm.set_fault(Fault.TRUNCATED, "metrics")
    status, body = await get(session, f"{vllm.url}/metrics")
    assert status == 200 and not body.endswith(b"\n") and len(body) < len(vllm.render_metrics())
    vllm.set_fault(Fault.OVERSIZED, "metrics")
    vllm.oversized_bytes = 3 * 1024 * 1024
    status, body = await get(session, f"{vllm.url}/metrics")
    assert status == 200 and len(body) >= 3 * 1024 * 1024


async def test_refuse_stops_listening_and_accept_listens_again_on_the_same_port(
    vllm: FakeVllm, session: aiohttp.ClientSession
) -> None:
    port = vllm.port
    await vllm.refuse()
    with pytest.raises(aiohttp.ClientConnectorError) as err:
        await get(session, f"http://127.0.0.1:{port}/health")
    assert err.value.os_error.errno == errno.ECONNREFUSED
    await vllm.accept()
    assert vllm.port == port
    assert await get(session, f"http://127.0.0.1:{port}/health") == (200, b"")


async def test_finish_and_abort_move_in_flight_to_request_success(vllm: FakeVllm, session: aiohttp.ClientSession) -> None:
    vllm.set_load(running=3, waiting=2, engine=0)
    assert vllm.in_flight == 5
    assert (vllm.finish(4), vllm.abort(5)) == (4, 1)
    fams = await families(session, vllm)
    assert total(fams, "vllm:request_success", "_total", finished_reason="stop") == 4
    assert total(fams, "vllm:request_success", "_total", finished_reason="abort") == 1
    assert vllm.in_flight == 0 and total(fams, "vllm:num_requests_waiting") == 0


async def test_restart_resets_every_counter(vllm: FakeVllm, session: aiohttp.ClientSession) -> None:
    vllm.observe_request(prompt_tokens=40)
    vllm.set_load(running=2)
    assert total(await families(session, vllm), "vllm:prompt_tokens", "_total") == 40
    vllm.restart()
    fams = await families(session, vllm)
    assert total(fams, "vllm:prompt_tokens", "_total") == 0
    assert total(fams, "vllm:num_requests_running") == 0


async def test_every_request_is_logged_with_its_headers(vllm: FakeVllm, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{vllm.url}/health", headers={"X-Probe": "yes"}):
        pass
    last = vllm.requests[-1]
    assert (last.method, last.path, last.headers["X-Probe"]) == ("GET", "/health", "yes")


def run_traffic(seed: int, steps: int) -> tuple[list[tuple[int, int]], bytes]:
    fake = FakeVllm(engines=2, traffic=TrafficPattern(seed=seed))
    trace = []
    for _ in range(steps):
        fake.simulate_step(1.0)
        trace.append((sum(fake.running), sum(fake.waiting)))
    counters = b"\n".join(
        line for line in fake.render_metrics().splitlines() if line.startswith(b"vllm:") and b"_created" not in line
    )
    return trace, counters


def test_traffic_simulation_is_deterministic_for_a_seed_and_builds_a_queue_in_the_burst() -> None:
    (trace, counters), again, other = run_traffic(7, 45), run_traffic(7, 45), run_traffic(8, 45)
    assert (trace, counters) == again and (trace, counters) != other
    assert max(waiting for _, waiting in trace[26:40]) > max(waiting for _, waiting in trace[:15])
    assert max(running for running, _ in trace) > 0
    assert b'vllm:request_success_total{engine="0",finished_reason="stop"' in counters
