"""vLLM metrics: one scrape summarized, the sliding window (rates, bucket-delta
quantiles, goodput), and the probe against a real FakeVllm on loopback."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from agent.sim.vllm import FakeVllm, Fault
from probes.base import ProbeError
from probes.histogram import Histogram
from probes.offloop_http import OffLoopGet
from probes.prom_text import PromParseError, PromParser
from probes.vllm import VllmMetricsProbe, kv_capacity
from probes.vllm_metrics import MAX_MODELS, SAMPLE_NAMES, InvalidScrape, ScrapeAccumulator, VllmScrape, VllmWindow, summarize

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "vllm"
NONE3 = {"p50": None, "p95": None, "p99": None}


def scrape_of(text: str) -> VllmScrape:
    return summarize(PromParser().parse(text).samples)


def fixture(name: str) -> VllmScrape:
    return scrape_of((FIXTURES / name).read_text())


def hist(name: str, bounds: list[float], cumulative: list[float], labels: str = 'engine="0",model_name="m"') -> str:
    lines = [f'{name}_bucket{{{labels},le="{b}"}} {c}' for b, c in zip([*map(str, bounds), "+Inf"], cumulative, strict=False)]
    return "\n".join([*lines, f"{name}_count{{{labels}}} {cumulative[-1]}", f"{name}_sum{{{labels}}} 0"]) + "\n"


def vllm_text(
    running: float = 0, waiting: float = 0, prompt: float | None = None, generation: float | None = None, extra: str = ""
) -> str:
    text = (
        f'vllm:num_requests_running{{engine="0",model_name="m"}} {running}\n'
        f'vllm:num_requests_waiting{{engine="0",model_name="m"}} {waiting}\n'
    )
    if prompt is not None:
        text += f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}\n'
        text += 'vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e+09\n'
    if generation is not None:
        text += f'vllm:generation_tokens_total{{engine="0",model_name="m"}} {generation}\n'
    return text + extra


# --- one scrape ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, running, waiting, kv, prompt, finished, engines, names",
    [
        ("v1_single_engine_derived.txt", 2, 4, 0.5161, 16347, {"stop": 14, "length": 7, "abort": 9, "error": 0}, 1, "v1"),
        ("v1_dp4_derived.txt", 12, 8, 0.5754, 57285, {"stop": 73, "length": 25, "abort": 22, "error": 0}, 4, "v1"),
        ("v1_multiprocess_derived.txt", 19, 2, 0.5961, 70257, {"stop": 101, "length": 31, "abort": 28, "error": 0}, 2, "v1"),
        ("v0_single_process_derived.txt", 3, 1, 0.0771, 918, {"length": 14, "stop": 11}, 1, "v0"),
        ("v0_multiprocess_qwen3_real.txt", 0, 0, 0.0, 43952, {"length": 38}, 1, "v0"),
        ("v1_early_partial_real.txt", 0, 0, 0.0, None, {}, 1, "v0"),
    ],
)
def test_fixture_sums_engines_and_takes_the_fullest_kv_cache(
    name: str,
    running: float,
    waiting: float,
    kv: float,
    prompt: float | None,
    finished: dict[str, float],
    engines: int,
    names: str,
) -> None:
    scrape = fixture(name)
    assert (scrape.requests_running, scrape.requests_waiting) == (running, waiting)
    assert scrape.kv_cache_usage_ratio == kv
    assert scrape.prompt_tokens_total == prompt
    assert scrape.finished_total == finished
    assert (scrape.engines, scrape.metric_names) == (engines, names)


def test_data_parallel_histograms_are_summed_bucket_by_bucket() -> None:
    scrape = fixture("v1_dp4_derived.txt")
    ttft = scrape.histograms["vllm:time_to_first_token_seconds"]
    assert ttft.total == 120  # 4 engines x 30 requests
    assert ttft.bounds[0] == 0.001 and ttft.bounds[-1] == 2560.0 and len(ttft.bounds) == 22
    assert scrape.generation_tokens_total == 4520 + 5420 + 5136 + 4324
    assert scrape.models == ("meta-llama/Llama-3.1-8B-Instruct",)


def test_pid_labelled_gauges_are_maxed_per_engine_never_summed() -> None:
    scrape = fixture("v1_multiprocess_derived.txt")
    assert scrape.kv_usage_by_engine == {"0": 0.5213, "1": 0.5961}
    doubled = scrape_of(
        vllm_text().replace("} 0\n", ',pid="1"} 4\n', 1) + 'vllm:num_requests_running{engine="0",model_name="m",pid="2"} 6\n'
    )
    assert doubled.requests_running == 6


@pytest.mark.parametrize(
    "kv_line, tpot_name",
    [
        ('vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n', "vllm:inter_token_latency_seconds"),
        ('vllm:gpu_cache_usage_perc{engine="0",model_name="m"} 0.25\n', "vllm:time_per_output_token_seconds"),
    ],
)
def test_old_and_new_metric_names_give_the_same_reading(kv_line: str, tpot_name: str) -> None:
    scrape = scrape_of(vllm_text(extra=kv_line + hist(tpot_name, [0.1, 0.2], [5, 10, 10])))
    assert scrape.kv_cache_usage_ratio == 0.25
    found = scrape.histogram("vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")
    assert found is not None and found[1].quantile(0.5) == 0.1


def test_new_kv_name_wins_when_both_are_served_and_names_read_mixed() -> None:
    scrape = scrape_of(vllm_text(extra='vllm:kv_cache_usage_perc{engine="0"} 0.3\nvllm:gpu_cache_usage_perc{engine="0"} 0.9\n'))
    assert scrape.kv_cache_usage_ratio == 0.3 and scrape.metric_names == "mixed"


def test_created_samples_are_never_taken_for_token_counts() -> None:
    assert scrape_of(vllm_text(prompt=5)).prompt_tokens_total == 5
    only_created = (
        vllm_text()
        + 'vllm:prompt_tokens_created{engine="0",model_name="m"} 1.7e+09\n'
        + 'vllm:request_success_created{finished_reason="stop"} 1.7e+09\n'
    )
    scrape = scrape_of(only_created)
    assert scrape.prompt_tokens_total is None and scrape.finished_total == {}


@pytest.mark.parametrize(
    "text, match",
    [
        ('vllm:prompt_tokens_total{engine="0"} 5\n', "num_requests_running"),
        (vllm_text() + 'vllm:e2e_request_latency_seconds_bucket{engine="0",le="1.0"} 3\n', "no \\+Inf bucket"),
    ],
)
def test_unusable_exposition_raises_parse_error(text: str, match: str) -> None:
    with pytest.raises(PromParseError, match=match):
        scrape_of(text)


@pytest.mark.parametrize(
    "text",
    [
        vllm_text(running=-5, waiting=5),
        vllm_text(running=2, waiting="+Inf"),
        vllm_text(running="NaN", waiting=0),
        vllm_text(extra='vllm:kv_cache_usage_perc{engine="0",model_name="m"} 1.5\n'),
        vllm_text(extra='vllm:kv_cache_usage_perc{engine="0",model_name="m"} -0.01\n'),
        vllm_text(prompt=-3),
        vllm_text(extra='vllm:request_success_total{engine="0",finished_reason="stop",model_name="m"} NaN\n'),
        vllm_text(extra=hist("vllm:time_to_first_token_seconds", [0.1], [-1, 2])),
    ],
)
def test_impossible_numbers_make_the_scrape_invalid_never_empty(text: str) -> None:
    with pytest.raises(InvalidScrape, match="not a possible value"):
        scrape_of(text)


def test_unknown_finished_reasons_are_folded_into_other() -> None:
    extra = "".join(
        f'vllm:request_success_total{{engine="0",finished_reason="{r}",model_name="m"}} 1\n'
        for r in ["stop", "length", "abort", "error", "repetition", *(f"r{i}" for i in range(1000))]
    )
    scrape = scrape_of(vllm_text(extra=extra))
    assert scrape.finished_total == {"stop": 1, "length": 1, "abort": 1, "error": 1, "repetition": 1, "other": 1000}


def test_many_models_are_counted_not_listed() -> None:
    lines = "".join(
        f'vllm:num_requests_running{{engine="0",model_name="m{i:03d}"}} 0\n'
        f'vllm:num_requests_waiting{{engine="0",model_name="m{i:03d}"}} 0\n'
        for i in range(100)
    )
    models = scrape_of(lines).models
    assert len(models) == MAX_MODELS + 1 and models[-1] == f"... and {100 - MAX_MODELS} more"


@pytest.mark.parametrize(("awake", "sleeping"), [(None, None), ("1.0", False), ("0.0", True)])
def test_engine_sleep_state_is_read_when_served(awake: str | None, sleeping: bool | None) -> None:
    extra = "" if awake is None else f'vllm:engine_sleep_state{{engine="0",model_name="m",sleep_state="awake"}} {awake}\n'
    assert scrape_of(vllm_text(extra=extra)).engine_sleeping is sleeping


@pytest.mark.parametrize(
    "info, configured, per_token, expected",
    [
        ("", None, None, (None, None, "unknown: no vllm:cache_config_info in the scrape")),
        (
            'block_size="16",num_gpu_blocks="1000",kv_cache_memory_bytes="None",engine="0"',
            None,
            None,
            (None, None, "unknown: kv_cache_memory_bytes is None and no per-token KV size is configured"),
        ),
        (
            'block_size="16",num_gpu_blocks="1000",kv_cache_memory_bytes="4000000",engine="0"',
            None,
            None,
            (4e6, 1e6, "vllm:cache_config_info kv_cache_memory_bytes"),
        ),
        (
            'block_size="16",num_gpu_blocks="1000",kv_cache_memory_bytes="None",engine="0"',
            None,
            100.0,
            (1.6e6, 4e5, "vllm:cache_config_info cache size in tokens x configured bytes per token"),
        ),
        ('block_size="16",num_gpu_blocks="1000",engine="0"', 8e9, None, (8e9, 2e9, "configured kv_cache_capacity_bytes")),
    ],
)
def test_kv_capacity_says_how_it_was_known_or_why_not(
    info: str, configured: float | None, per_token: float | None, expected: tuple
) -> None:
    extra = 'vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.25\n' + (
        f"vllm:cache_config_info{{{info}}} 1.0\n" if info else ""
    )
    assert kv_capacity(scrape_of(vllm_text(extra=extra)), configured_bytes=configured, bytes_per_token=per_token) == expected


# --- histogram math --------------------------------------------------------------------


@pytest.mark.parametrize(
    "bounds, cumulative, q, expected",
    [
        ([0.1, 0.5, 1.0], [0, 10, 20, 20], 0.5, 0.5),  # rank 10 fills (0.1, 0.5]
        ([0.1, 0.5, 1.0], [0, 10, 20, 20], 0.95, 0.95),  # 0.5 + 0.5 * 9/10
        ([0.1, 0.5, 1.0], [4, 4, 4, 4], 0.5, 0.05),  # first bucket interpolates from 0
        ([0.1, 0.5, 1.0], [0, 0, 1, 10], 0.99, 1.0),  # in +Inf: the last finite bound
        ([0.1, 0.5, 1.0], [2, 1, 4, 4], 0.75, 0.75),  # a racing scrape's dip is evened out like Prometheus
        ([], [7], 0.5, None),  # only +Inf: nothing to interpolate
        ([0.1], [0, 0], 0.5, None),  # nothing observed
    ],
)
def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile(
    bounds: list[float], cumulative: list[float], q: float, expected: float | None
) -> None:
    result = Histogram(tuple(bounds), tuple(cumulative)).quantile(q)
    assert result == (None if expected is None else pytest.approx(expected))


@pytest.mark.parametrize(
    "x, expected",
    [(2.0, 0.8), (3.0, 0.9), (0.5, 0.3), (100.0, 1.0), (4.0, 1.0)],
)
def test_share_within_a_threshold_interpolates_inside_the_bucket(x: float, expected: float) -> None:
    assert Histogram((1.0, 2.0, 4.0), (6, 8, 10, 10)).share_at_most(x) == pytest.approx(expected)


def test_share_counts_the_inf_bucket_as_over_the_threshold() -> None:
    assert Histogram((1.0,), (3, 4)).share_at_most(50.0) == 0.75


# --- the window ------------------------------------------------------------------------

TTFT_NAME = "vllm:time_to_first_token_seconds"
ITL_NAME = "vllm:inter_token_latency_seconds"


def test_rates_come_from_counter_deltas_over_the_window() -> None:
    window = VllmWindow(60)
    window.add(0.0, scrape_of(vllm_text(prompt=1000, generation=10)))
    window.add(10.0, scrape_of(vllm_text(prompt=2000, generation=510)))
    stats = window.derive(2.0, 0.1)
    assert (stats.prompt_tokens_per_s, stats.generation_tokens_per_s, stats.window_s) == (100.0, 50.0, 10.0)


def test_counter_going_backwards_restarts_the_window_instead_of_a_negative_rate() -> None:
    window = VllmWindow(60)
    window.add(0.0, scrape_of(vllm_text(prompt=1000)))
    window.add(10.0, scrape_of(vllm_text(prompt=2000)))
    assert window.add(20.0, scrape_of(vllm_text(prompt=50))) is True  # vLLM restarted
    stats = window.derive(2.0, 0.1)
    assert stats.prompt_tokens_per_s is None and stats.window_s == 0.0 and window.restarts == 1
    window.add(30.0, scrape_of(vllm_text(prompt=150)))
    assert window.derive(2.0, 0.1).prompt_tokens_per_s == 10.0


def test_histogram_count_going_backwards_restarts_the_window() -> None:
    window = VllmWindow(60)
    window.add(0.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [1.0], [50, 50]))))
    assert window.add(5.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [1.0], [2, 2])))) is True


def test_empty_window_gives_none_and_says_why() -> None:
    stats = VllmWindow(60).derive(2.0, 0.1)
    assert (stats.prompt_tokens_per_s, stats.ttft_s, stats.goodput_ratio) == (None, NONE3, None)
    assert stats.notes == ("no scrape in the window yet",)


def test_one_scrape_gives_no_quantiles_and_says_why() -> None:
    window = VllmWindow(60)
    window.add(0.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [1.0], [5, 5]))))
    stats = window.derive(2.0, 0.1)
    assert stats.ttft_s == NONE3 and any("one scrape" in note for note in stats.notes)


def test_quantiles_come_from_the_window_deltas_not_the_totals_since_boot() -> None:
    window = VllmWindow(60)
    # 100 fast requests before the window, then 10 in (0.1, 0.5] and 10 in (0.5, 1.0] inside it.
    window.add(0.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [0.1, 0.5, 1.0], [100, 100, 100, 100]))))
    window.add(30.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [0.1, 0.5, 1.0], [100, 110, 120, 120]))))
    stats = window.derive(2.0, 0.1)
    assert stats.ttft_s == {"p50": pytest.approx(0.5), "p95": pytest.approx(0.95), "p99": pytest.approx(0.99)}


def test_bucket_bounds_are_read_from_the_scrape() -> None:
    window = VllmWindow(60)
    window.add(0.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [3.0, 7.0], [0, 0, 0]))))
    window.add(1.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [3.0, 7.0], [0, 4, 4]))))
    assert window.derive(2.0, 0.1).ttft_s["p50"] == pytest.approx(5.0)


def test_inf_only_histogram_gives_no_quantile_and_says_why() -> None:
    window = VllmWindow(60)
    window.add(0.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [], [0]))))
    window.add(1.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [], [9]))))
    stats = window.derive(2.0, 0.1)
    assert stats.ttft_s == NONE3 and "ttft: the histogram has only the +Inf bucket" in stats.notes


def test_window_slides_and_forgets_old_scrapes() -> None:
    window = VllmWindow(30)
    for t, prompt in ((0.0, 0), (20.0, 10_000), (40.0, 10_200), (50.0, 10_300)):
        window.add(t, scrape_of(vllm_text(prompt=prompt)))
    stats = window.derive(2.0, 0.1)
    assert (len(window), stats.window_s, stats.prompt_tokens_per_s) == (3, 30.0, 10.0)


def test_goodput_is_the_smaller_share_within_the_ttft_and_tpot_slos() -> None:
    window = VllmWindow(60)
    before = hist(TTFT_NAME, [1.0, 2.0, 4.0], [0, 0, 0, 0]) + hist(ITL_NAME, [0.05, 0.1, 0.2], [0, 0, 0, 0])
    after = hist(TTFT_NAME, [1.0, 2.0, 4.0], [6, 8, 10, 10]) + hist(ITL_NAME, [0.05, 0.1, 0.2], [9, 9, 10, 10])
    window.add(0.0, scrape_of(vllm_text(extra=before)))
    window.add(10.0, scrape_of(vllm_text(extra=after)))
    assert window.derive(2.0, 0.1).goodput_ratio == pytest.approx(0.8)  # TTFT 8/10 within, TPOT 9/10
    assert window.derive(3.0, 0.1).goodput_ratio == pytest.approx(0.9)  # TTFT 9/10 (interpolated), TPOT 9/10
    assert window.derive(3.0, 0.04).goodput_ratio == pytest.approx(0.72)  # TPOT 9 * 0.8 / 10


def test_goodput_prefers_the_per_request_tpot_histogram() -> None:
    window = VllmWindow(60)
    per_token = hist(ITL_NAME, [0.1], [1, 100])  # most tokens slow...
    per_request = hist("vllm:request_time_per_output_token_seconds", [0.1], [10, 10])  # ...but every request's mean is fine
    window.add(
        0.0,
        scrape_of(
            vllm_text(extra=hist(ITL_NAME, [0.1], [0, 0]) + hist("vllm:request_time_per_output_token_seconds", [0.1], [0, 0]))
        ),
    )
    window.add(10.0, scrape_of(vllm_text(extra=per_token + per_request)))
    assert window.derive(2.0, 0.1).goodput_ratio == 1.0


def test_no_request_in_the_window_means_no_goodput() -> None:
    window = VllmWindow(60)
    window.add(0.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [1.0], [5, 5]))))
    window.add(10.0, scrape_of(vllm_text(extra=hist(TTFT_NAME, [1.0], [5, 5]))))
    stats = window.derive(2.0, 0.1)
    assert stats.goodput_ratio is None and any(note.startswith("goodput: no request in the window") for note in stats.notes)


# --- the probe against FakeVllm ------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def vllm() -> AsyncIterator[FakeVllm]:
    fake = FakeVllm(engines=2)
    await fake.start()
    yield fake
    await fake.stop()


Clients = Callable[[str], OffLoopGet]


@pytest.fixture
def clients() -> Iterator[Clients]:
    """OffLoopGet for a URL, closed (its thread ended) after the test."""
    made: list[OffLoopGet] = []

    def make(url: str) -> OffLoopGet:
        made.append(OffLoopGet(url))
        return made[-1]

    yield make
    for client in made:
        client.close()


def make_probe(vllm: FakeVllm, clients: Clients, clock: Clock, **kwargs: object) -> VllmMetricsProbe:
    return VllmMetricsProbe(clients(vllm.url), clock=clock, timeout_s=kwargs.pop("timeout_s", 1.0), **kwargs)  # type: ignore[arg-type]


async def test_probe_reads_in_flight_summed_over_engines(vllm: FakeVllm, clients: Clients) -> None:
    vllm.set_load(running=3, waiting=2, engine=0)
    vllm.set_load(running=1, waiting=0, engine=1)
    vllm.kv_cache_usage = [0.2, 0.7]
    reading = await make_probe(vllm, clients, Clock()).sample()
    assert (reading.requests_running, reading.requests_waiting, reading.in_flight) == (4, 2, 6)
    assert (reading.kv_cache_usage_ratio, reading.engines, reading.metric_names, reading.models) == (
        0.7,
        2,
        "v1",
        ("fake/llama-3-8b",),
    )
    last = vllm.requests[-1]
    assert (last.method, last.path, last.headers["Accept-Encoding"]) == ("GET", "/metrics", "identity")


async def test_probe_derives_rates_quantiles_and_finished_counts(vllm: FakeVllm, clients: Clients) -> None:
    clock = Clock()
    probe = make_probe(vllm, clients, clock)
    await probe.sample()
    vllm.ttft_s, vllm.tpot_s = 0.3, 0.03
    for _ in range(10):
        vllm.observe_request(engine=1, prompt_tokens=100, output_tokens=11, reason="length")
    vllm.set_load(running=4)
    assert (vllm.finish(3), vllm.abort(1)) == (3, 1)  # finished ones use the defaults: 32 prompt, 16 generated
    clock.t += 10
    reading = await probe.sample()
    assert (reading.prompt_tokens_per_s, reading.generation_tokens_per_s) == (pytest.approx(109.6), pytest.approx(15.8))
    assert reading.ttft_s["p50"] == pytest.approx(0.25 + 0.25 * 6.5 / 13)  # all 13 in (0.25, 0.5]
    assert reading.requests_finished_total == {"stop": 3.0, "length": 10.0, "abort": 1.0}
    assert (reading.requests_completed_total, reading.requests_aborted_total, reading.in_flight) == (13.0, 1.0, 0.0)
    assert reading.goodput_ratio == 1.0 and reading.window_s == 10.0


async def test_restarted_vllm_restarts_the_window_with_no_negative_rate(vllm: FakeVllm, clients: Clients) -> None:
    clock = Clock()
    probe = make_probe(vllm, clients, clock)
    vllm.observe_request(prompt_tokens=500)
    await probe.sample()
    vllm.restart()
    clock.t += 1
    reading = await probe.sample()
    assert reading.prompt_tokens_per_s is None and probe.window.restarts == 1


@pytest.mark.parametrize(
    "fault, code",
    [
        (Fault.GARBAGE, "garbage"),
        (Fault.TRUNCATED, "garbage"),
        (Fault.HTTP_503, "http_503"),
        (Fault.HTTP_500, "http_500"),
        (Fault.SLOW, "timeout"),
        (Fault.HANG, "timeout"),
        (Fault.OVERSIZED, "too_large"),
    ],
)
async def test_failed_scrape_raises_its_code_and_leaves_the_window_alone(
    vllm: FakeVllm, clients: Clients, fault: Fault, code: str
) -> None:
    clock = Clock()
    probe = make_probe(vllm, clients, clock, timeout_s=0.3, max_bytes=256 * 1024)
    await probe.sample()
    before = list(probe.window._points)
    vllm.set_fault(fault, "metrics")
    vllm.oversized_bytes = 2 * 1024 * 1024
    clock.t += 1
    with pytest.raises(ProbeError) as err:
        await probe.sample()
    assert err.value.code == code
    assert list(probe.window._points) == before
    assert vllm.requests[-1].path == "/metrics"


async def test_refusing_vllm_is_refused_and_comes_back_on_the_same_port(vllm: FakeVllm, clients: Clients) -> None:
    probe = make_probe(vllm, clients, Clock())
    await probe.sample()
    port = vllm.port
    await vllm.refuse()
    with pytest.raises(ProbeError) as err:
        await probe.sample()
    assert err.value.code == "refused" and len(probe.window) == 1
    await vllm.accept()
    assert vllm.port == port
    assert (await probe.sample()).engines == 2


async def test_announced_oversized_body_is_refused_before_reading(clients: Clients) -> None:
    fake = FakeVllm(engines=4)
    await fake.start()
    try:
        for _ in range(5):
            fake.observe_request()
        with pytest.raises(ProbeError) as err:
            await make_probe(fake, clients, Clock(), max_bytes=4096).sample()
        assert err.value.code == "too_large"
    finally:
        await fake.stop()


async def test_v0_server_reads_with_the_old_names(clients: Clients) -> None:
    fake = FakeVllm(metric_names="v0")
    await fake.start()
    try:
        fake.set_load(running=5)
        fake.kv_cache_usage = [0.4]
        reading = await make_probe(fake, clients, Clock()).sample()
        assert (reading.in_flight, reading.kv_cache_usage_ratio, reading.metric_names, reading.engine_sleeping) == (
            5,
            0.4,
            "v0",
            None,
        )
    finally:
        await fake.stop()


async def test_server_dropping_the_connection_is_a_connection_error(clients: Clients) -> None:
    async def slam(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(slam, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(ProbeError) as err:
            await VllmMetricsProbe(clients(f"http://127.0.0.1:{port}"), clock=Clock()).sample()
        assert err.value.code == "connection"
    finally:
        server.close()
        await server.wait_closed()


async def test_kv_bytes_come_from_cache_config_info_when_vllm_knows_them(clients: Clients) -> None:
    fake = FakeVllm(engines=2, kv_cache_memory_bytes=10_000_000_000)
    await fake.start()
    try:
        fake.kv_cache_usage = [0.5, 0.1]
        reading = await make_probe(fake, clients, Clock()).sample()
        assert (reading.kv_cache_capacity_bytes, reading.kv_cache_used_bytes) == (2e10, pytest.approx(6e9))
        assert reading.kv_capacity_source == "vllm:cache_config_info kv_cache_memory_bytes"
    finally:
        await fake.stop()


def test_probe_deadline_sits_above_its_own_call_timeout() -> None:
    probe = VllmMetricsProbe(OffLoopGet("http://127.0.0.1:1/"), timeout_s=2.0)
    assert (probe.name, probe.interval_s, probe.timeout_s) == ("vllm", 1.0, 3.0)


class WithOtherFamilies(FakeVllm):
    """FakeVllm plus families a V1 server serves that the agent does not read."""

    def render_metrics(self) -> bytes:
        other = b"".join(
            b'vllm:iteration_tokens_total_bucket{engine="%d",le="%d",model_name="%s"} %d.0\n' % (e, le, self.model.encode(), le)
            for e in range(self.engines)
            for le in (1, 8, 16, 32)
        )
        head = b"# HELP vllm:iteration_tokens_total Tokens per step.\n# TYPE vllm:iteration_tokens_total histogram\n"
        return super().render_metrics() + head + other + b'vllm:prefix_cache_hits_total{engine="0",model_name="m"} 7.0\n'


async def test_families_the_agent_does_not_read_change_nothing_in_the_reading(clients: Clients) -> None:
    # The probe parses only the names it reads: the same node with more families reads the same.
    plain, padded = FakeVllm(engines=2), WithOtherFamilies(engines=2)
    for fake in (plain, padded):
        await fake.start()
    try:
        clock = Clock()
        probes = [make_probe(fake, clients, clock) for fake in (plain, padded)]
        for step in range(3):
            for fake in (plain, padded):
                fake.set_load(running=3 + step, waiting=step, engine=0)
                for _ in range(4):
                    fake.observe_request(engine=1, ttft_s=0.2 * (step + 1), tpot_s=0.02)
            clock.t += 1.0
            first, second = [await probe.sample() for probe in probes]
            assert first == second
        assert first.in_flight == 5 + 2 and first.ttft_s["p50"] is not None
        assert b"vllm:iteration_tokens_total_bucket" in padded.render_metrics()
    finally:
        for fake in (plain, padded):
            await fake.stop()


@pytest.mark.parametrize("engines", [1, 4])
def test_the_names_the_probe_parses_give_the_scrape_a_full_parse_gives(engines: int) -> None:
    fake = WithOtherFamilies(engines=engines)
    for engine in range(engines):
        fake.set_load(running=2 + engine, waiting=engine, engine=engine)
        fake.kv_cache_usage[engine] = 0.1 * (engine + 1)
        for i in range(6):
            fake.observe_request(engine=engine, ttft_s=0.1 * (i + 1), reason="length" if i % 3 else "abort", queue_s=0.01 * i)
    text = fake.render_metrics().decode()
    acc = ScrapeAccumulator()
    for batch in PromParser().batches(text, 25, names=SAMPLE_NAMES):
        acc.feed(batch)
    assert acc.finish() == summarize(PromParser().parse(text).samples)
