"""A fast, strict parser of the Prometheus text exposition format 0.0.4.

Every line is checked, so a truncated, binary or HTML body raises PromParseError
instead of being half-used. It is on the hot path (vLLM's /metrics every second),
so the series part of a line (`name{labels}`) is parsed once and cached: the
same series come back in every scrape, only their values change.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from types import MappingProxyType
from typing import NamedTuple

__all__ = ["Exposition", "ExpositionTooLarge", "PromParseError", "PromParser", "Sample", "parse", "parse_bytes"]

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[ \t]*([a-zA-Z_][a-zA-Z0-9_]*)[ \t]*=[ \t]*"((?:[^"\\\n]|\\.)*)"[ \t]*'
_NAME_RE = re.compile(_NAME)
_LABEL_RE = re.compile(_LABEL)
# The whole label body: pairs separated by commas, a trailing comma allowed (as in Go's parser).
_LABELS_BODY_RE = re.compile(rf"(?:{_LABEL}(?:,{_LABEL})*,?)?[ \t]*")
_SERIES_RE = re.compile(rf"({_NAME})[ \t]*(?:\{{(.*)\}})?", re.DOTALL)
_ESCAPE_RE = re.compile(r"\\(.)")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}
_SPECIAL_VALUES = {"+Inf": math.inf, "Inf": math.inf, "-Inf": -math.inf, "NaN": math.nan}
# Go's ParseFloat (the reference parser) also takes these spellings, in any case.
_SPECIAL_LOWER = {
    "inf": math.inf, "+inf": math.inf, "infinity": math.inf, "+infinity": math.inf,
    "-inf": -math.inf, "-infinity": -math.inf, "nan": math.nan,
}
_TYPES = frozenset({"counter", "gauge", "histogram", "summary", "untyped"})
_EMPTY_LABELS: MappingProxyType[str, str] = MappingProxyType({})


class PromParseError(ValueError):
    """The body is not valid exposition text; the message names the line."""


class ExpositionTooLarge(PromParseError):
    """A line longer than the parser takes: nothing a sane exporter writes."""


class Sample(NamedTuple):
    """One sample line. `labels` is read-only: it is shared by every scrape of the series."""

    name: str
    labels: MappingProxyType[str, str]
    value: float
    timestamp_ms: int | None = None


class Exposition(NamedTuple):
    samples: list[Sample]
    types: dict[str, str]  # metric family -> type, from the # TYPE lines


class PromParser:
    """Parser with a bounded cache of parsed series; one per scraped target.

    `batches()` yields the samples a few hundred lines at a time, so a caller on an
    event loop can yield between batches; `parse()` is all of it at once.
    """

    def __init__(self, max_cached_series: int = 50_000, max_line_chars: int = 64 * 1024) -> None:
        self._series: dict[str, tuple[str, MappingProxyType[str, str]]] = {}
        self._max_cached_series = max_cached_series
        self._max_line_chars = max_line_chars

    def parse_bytes(self, body: bytes) -> Exposition:
        return self.parse(decode(body))

    def parse(self, text: str) -> Exposition:
        types: dict[str, str] = {}
        samples: list[Sample] = []
        for batch in self.batches(text, types=types):
            samples.extend(batch)
        return Exposition(samples, types)

    def batches(
        self,
        text: str,
        batch_lines: int = 0,
        types: dict[str, str] | None = None,
        names: frozenset[str] | None = None,
    ) -> Iterator[list[Sample]]:
        """The samples of `text`, `batch_lines` lines at a time (0: all in one batch);
        `types` collects the # TYPE lines. With `names`, only samples of those names are
        parsed; other sample lines are skipped unchecked (a vLLM scrape reads a third of
        its lines), while # HELP / # TYPE lines and the final line feed are still checked."""
        if text and not text.endswith("\n"):
            # The format requires a final line feed; without it the body was cut short.
            raise PromParseError("body does not end with a line feed (truncated?)")
        if len(self._series) > self._max_cached_series:
            self._series.clear()  # a target with ever-new series must not grow us without bound
        lines = text.split("\n")
        step = batch_lines or len(lines) or 1
        types = {} if types is None else types
        for start in range(0, len(lines), step):
            yield self._parse_lines(lines, start, min(start + step, len(lines)), types, names)

    def _parse_lines(
        self, lines: list[str], start: int, end: int, types: dict[str, str], names: frozenset[str] | None
    ) -> list[Sample]:
        samples: list[Sample] = []
        series_cache = self._series
        append = samples.append
        max_chars = self._max_line_chars
        for lineno in range(start + 1, end + 1):
            line = lines[lineno - 1]
            if not line:
                continue
            if len(line) > max_chars:  # before any regex: a 7 MB line would take seconds
                raise ExpositionTooLarge(f"line {lineno}: {len(line)} characters, over {max_chars}")
            if line[0] == "#":
                _comment(line, lineno, types)
                continue
            brace = line.find("{")
            name_end = brace if brace >= 0 else _first_blank(line)
            if names is not None and line[:name_end].rstrip(" \t") not in names:
                continue
            if brace < 0:
                cut = name_end
            else:
                cut = line.rfind("}") + 1
                if cut == 0:
                    raise PromParseError(f"line {lineno}: unclosed label set: {_show(line)}")
            key = line[:cut]
            series = series_cache.get(key)
            if series is None:
                series = _parse_series(key, lineno)
                series_cache[key] = series
            fields = line[cut:].split()
            number = fields[0] if len(fields) == 1 and line[cut] in " \t" else ""
            if number.isascii() and number[-1:].isdigit() and "_" not in number:
                try:  # the common case, inline: one plain number, no timestamp
                    append(Sample(series[0], series[1], float(number)))
                    continue
                except ValueError:
                    pass
            value, timestamp = _value_and_timestamp(line, cut, lineno)
            append(Sample(series[0], series[1], value, timestamp))
        return samples


def decode(body: bytes) -> str:
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PromParseError(f"not UTF-8 text: {exc}") from None


_DEFAULT = PromParser()


def parse(text: str) -> Exposition:
    """Parse with a module-wide parser (its series cache is shared by every caller)."""
    return _DEFAULT.parse(text)


def parse_bytes(body: bytes) -> Exposition:
    return _DEFAULT.parse_bytes(body)


def _first_blank(line: str) -> int:
    space = line.find(" ")
    tab = line.find("\t")
    if space < 0:
        return tab if tab >= 0 else len(line)
    return space if tab < 0 else min(space, tab)


def _parse_series(key: str, lineno: int) -> tuple[str, MappingProxyType[str, str]]:
    match = _SERIES_RE.fullmatch(key)
    if match is None:
        raise PromParseError(f"line {lineno}: bad metric name or label set: {_show(key)}")
    name, body = match.group(1), match.group(2)
    if not body or not body.strip(" \t"):
        return name, _EMPTY_LABELS
    if _LABELS_BODY_RE.fullmatch(body) is None:
        raise PromParseError(f"line {lineno}: bad label set: {_show(key)}")
    labels: dict[str, str] = {}
    for label in _LABEL_RE.finditer(body):
        label_name, raw = label.group(1), label.group(2)
        if label_name in labels:
            raise PromParseError(f"line {lineno}: label {label_name!r} repeated: {_show(key)}")
        labels[label_name] = _unescape(raw, lineno) if "\\" in raw else raw
    return name, MappingProxyType(labels)


def _unescape(raw: str, lineno: int) -> str:
    def one(match: re.Match[str]) -> str:
        char = match.group(1)
        if char not in _ESCAPES:
            raise PromParseError(f"line {lineno}: invalid escape \\{char} in a label value")
        return _ESCAPES[char]

    return _ESCAPE_RE.sub(one, raw)


def _value_and_timestamp(line: str, cut: int, lineno: int) -> tuple[float, int | None]:
    rest = line[cut:]
    if not rest or rest[0] not in " \t":
        raise PromParseError(f"line {lineno}: no value after the series: {_show(line)}")
    fields = rest.split()
    if len(fields) == 1:
        return _float(fields[0], lineno, line), None
    if len(fields) == 2:
        stamp = fields[1]
        body = stamp[1:] if stamp[:1] == "-" else stamp
        if not (body.isascii() and body.isdigit()):
            raise PromParseError(f"line {lineno}: bad timestamp {stamp!r}")
        return _float(fields[0], lineno, line), int(stamp)
    raise PromParseError(f"line {lineno}: unexpected text after the value: {_show(line)}")


def _float(text: str, lineno: int, line: str) -> float:
    special = _SPECIAL_VALUES.get(text)
    if special is not None:
        return special
    if text[-1:].isalpha():
        special = _SPECIAL_LOWER.get(text.lower())
        if special is not None:
            return special
    # float() is laxer than the format: it takes "1_0" and non-ASCII digits.
    if not text.isascii() or "_" in text:
        raise PromParseError(f"line {lineno}: bad value {text!r}: {_show(line)}")
    try:
        return float(text)
    except ValueError:
        raise PromParseError(f"line {lineno}: bad value {text!r}: {_show(line)}") from None


def _comment(line: str, lineno: int, types: dict[str, str]) -> None:
    parts = line.split(None, 3)
    if len(parts) < 2 or parts[1] not in ("HELP", "TYPE"):
        return  # a plain comment
    if len(parts) < 3 or _NAME_RE.fullmatch(parts[2]) is None:
        raise PromParseError(f"line {lineno}: bad {parts[1]} line: {_show(line)}")
    if parts[1] == "TYPE":
        kind = parts[3].strip() if len(parts) == 4 else ""
        if kind not in _TYPES:
            raise PromParseError(f"line {lineno}: unknown metric type {kind!r}")
        if types.setdefault(parts[2], kind) != kind:
            raise PromParseError(f"line {lineno}: second TYPE for {parts[2]}")


def _show(text: str) -> str:
    return repr(text if len(text) <= 120 else text[:117] + "...")
