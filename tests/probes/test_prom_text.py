"""The exposition parser: what it accepts, what it rejects, and that it agrees with
prometheus_client's own parser on every vLLM fixture."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from probes.prom_text import PromParseError, PromParser, parse, parse_bytes

FIXTURES = sorted((Path(__file__).resolve().parent.parent / "fixtures" / "vllm").glob("*.txt"))


@pytest.mark.parametrize(
    "text, name, labels, value, timestamp_ms",
    [
        ("up 1\n", "up", {}, 1.0, None),
        ("up{} 1\n", "up", {}, 1.0, None),
        (
            'vllm:num_requests_running{engine="0",model_name="m"} 3.0\n',
            "vllm:num_requests_running",
            {"engine": "0", "model_name": "m"},
            3.0,
            None,
        ),
        ('a{x="1",} 2\n', "a", {"x": "1"}, 2.0, None),  # trailing comma, as Go's parser allows
        ('a{ x = "1" , y="2" } 2\n', "a", {"x": "1", "y": "2"}, 2.0, None),
        ('a{path="C:\\\\dir\\"q\\"\\nnext"} 1\n', "a", {"path": 'C:\\dir"q"\nnext'}, 1.0, None),
        ('a{v="{}, =\\""} 1\n', "a", {"v": '{}, ="'}, 1.0, None),
        ("a 1.5e+09 1700000000000\n", "a", {}, 1.5e9, 1700000000000),
        ("a\t-2\t-5\n", "a", {}, -2.0, -5),
        ('b_bucket{le="+Inf"} +Inf\n', "b_bucket", {"le": "+Inf"}, math.inf, None),
        ("c -Inf\n", "c", {}, -math.inf, None),
        ("c inf\n", "c", {}, math.inf, None),
        ('a{model_name="Qwen/Qwen3-8B ü"} 7\n', "a", {"model_name": "Qwen/Qwen3-8B ü"}, 7.0, None),
    ],
)
def test_valid_sample_lines_parse_to_name_labels_value_and_timestamp(
    text: str, name: str, labels: dict[str, str], value: float, timestamp_ms: int | None
) -> None:
    (sample,) = PromParser().parse(text).samples
    assert (sample.name, dict(sample.labels), sample.value, sample.timestamp_ms) == (name, labels, value, timestamp_ms)


def test_nan_value_is_read_as_nan() -> None:
    (sample,) = parse("a NaN\n").samples
    assert math.isnan(sample.value)


def test_help_and_type_lines_give_the_family_types_and_comments_are_skipped() -> None:
    text = "# HELP a Some help, with # and {braces}\n# TYPE a counter\n# just a comment\n\na_total 1\n# TYPE h histogram\n"
    exposition = parse(text)
    assert exposition.types == {"a": "counter", "h": "histogram"}
    assert [s.name for s in exposition.samples] == ["a_total"]


def test_created_samples_are_separate_samples_never_merged_into_the_counter() -> None:
    text = (
        '# TYPE vllm:prompt_tokens_total counter\nvllm:prompt_tokens_total{engine="0"} 5.0\n'
        '# TYPE vllm:prompt_tokens_created gauge\nvllm:prompt_tokens_created{engine="0"} 1.7e+09\n'
    )
    assert [(s.name, s.value) for s in parse(text).samples] == [
        ("vllm:prompt_tokens_total", 5.0),
        ("vllm:prompt_tokens_created", 1.7e9),
    ]


@pytest.mark.parametrize(
    "text, why",
    [
        ('vllm:num_requests_running{engine="0"} 3', "no final line feed (truncated)"),
        ('vllm:num_requests_running{engine="0', "cut inside a label"),
        ('a{x="1"} 1\nb{y="2"\n', "unclosed label set"),
        ("<html><body>502 Bad Gateway</body></html>\n", "HTML"),
        ("a\n", "no value"),
        ("a 1 2 3\n", "extra text"),
        ("a one\n", "not a number"),
        ("a 1_000\n", "underscore digits float() would take"),
        ("a \u0661\n", "non-ASCII digit float() would take"),
        ("a 1 12.5\n", "fractional timestamp"),
        ('a{x="1",x="2"} 1\n', "repeated label"),
        ('a{x="\\t"} 1\n', "invalid escape"),
        ("a{x=1} 1\n", "unquoted label value"),
        ('a{1x="1"} 1\n', "bad label name"),
        ("1a 1\n", "bad metric name"),
        ("a\x00 1\n", "NUL byte"),
        ("# TYPE a gauge\n# TYPE a counter\na 1\n", "two types for one family"),
        ("# TYPE a thing\n", "unknown type"),
        ("# TYPE\n", "TYPE without a name"),
        ('a{x="1"}1\n', "no blank before the value"),
    ],
)
def test_garbage_raises_parse_error(text: str, why: str) -> None:
    with pytest.raises(PromParseError):
        PromParser().parse(text)


def test_binary_body_is_rejected_as_not_utf8() -> None:
    with pytest.raises(PromParseError, match="UTF-8"):
        parse_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe\n")


def test_parse_error_is_a_value_error_and_names_the_line() -> None:
    with pytest.raises(ValueError, match="line 2"):
        parse("a 1\nb ?\n")


def test_empty_body_has_no_samples() -> None:
    assert parse("").samples == []


def test_labels_are_read_only_because_the_cache_shares_them_between_scrapes() -> None:
    parser = PromParser()
    first = parser.parse('a{x="1"} 1\n').samples[0]
    second = parser.parse('a{x="1"} 2\n').samples[0]
    assert first.labels is second.labels and second.value == 2.0
    with pytest.raises(TypeError):
        first.labels["x"] = "2"  # type: ignore[index]


def test_series_cache_is_bounded() -> None:
    parser = PromParser(max_cached_series=10)
    for i in range(50):
        parser.parse(f'a{{i="{i}"}} 1\n')
    assert len(parser._series) <= 11


@pytest.mark.parametrize("path", FIXTURES, ids=[p.name for p in FIXTURES])
def test_every_fixture_parses_exactly_like_prometheus_client(path: Path) -> None:
    text = path.read_text()
    ours = sorted((s.name, tuple(sorted(s.labels.items())), s.value) for s in parse(text).samples)
    theirs = sorted(
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
    )
    assert ours == theirs and len(ours) >= 5


def test_with_names_only_those_samples_are_parsed_and_other_lines_are_skipped_unchecked() -> None:
    text = (
        "# TYPE wanted gauge\n"
        'wanted{engine="0"} 1\n'
        'wanted {engine="1"} 2\n'  # a blank before the labels is allowed: still this name
        "unwanted{this is not a label set at all\n"
        "also_unwanted 1 2 3 4\n"
        "wanted 3\n"
    )
    samples = [s for batch in PromParser().batches(text, 2, names=frozenset({"wanted"})) for s in batch]
    assert [(s.name, dict(s.labels), s.value) for s in samples] == [
        ("wanted", {"engine": "0"}, 1.0),
        ("wanted", {"engine": "1"}, 2.0),
        ("wanted", {}, 3.0),
    ]
    with pytest.raises(PromParseError, match="unclosed label set"):
        PromParser().parse(text)  # without names every line is checked


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("# TYPE wanted sometype\nwanted 1\n", "unknown metric type"),
        ("wanted 1\nunwanted 2", "does not end with a line feed"),
        ('wanted{engine="0" 1\n', "unclosed label set"),
    ],
)
def test_with_names_comments_the_final_line_feed_and_wanted_lines_are_still_checked(text: str, why: str) -> None:
    with pytest.raises(PromParseError, match=why):
        list(PromParser().batches(text, names=frozenset({"wanted"})))
