"""Arrival traces: the CSV format users feed their own load in, Poisson arrivals drawn
from a trace, and the generator of the sample traces in bench/traces/.

Format (one file per trace, UTF-8 CSV, `#` lines are comments):

    t_s,rps[,prompt_tokens,output_tokens]
    0,8.0
    300,8.4
    ...

- `t_s`: seconds from the start of the trace; the first row is 0, strictly increasing.
- `rps`: mean arrival rate (requests per second) at t_s; between two rows the rate
  is linear, so a sharp burst is two close rows (`3600,20` then `3660,80`). The trace
  ends at the last row.
- `prompt_tokens`, `output_tokens` (optional, both or neither): mean tokens per request
  at t_s, linear in between; without them the node model's defaults hold.

From per-minute request counts (load-balancer logs), write t_s = minute * 60 and
rps = count / 60. Arrivals in one simulation step are Poisson with the trace's mean
at the middle of the step, drawn from a seeded generator: the same seed gives the
same arrivals to every policy.

    python -m bench.fleet.trace --write bench/traces   # regenerate the samples
"""

from __future__ import annotations

import argparse
import bisect
import csv
import itertools
import math
import random
from dataclasses import dataclass
from pathlib import Path

HOUR_S = 3600.0


class TraceError(ValueError):
    """A trace file that does not follow the format; the message names the line."""


@dataclass(frozen=True, slots=True)
class Trace:
    name: str
    times_s: tuple[float, ...]
    rps: tuple[float, ...]
    prompt_tokens: tuple[float, ...] | None = None
    output_tokens: tuple[float, ...] | None = None

    @property
    def duration_s(self) -> float:
        return self.times_s[-1]

    def _at(self, values: tuple[float, ...], t_s: float) -> float:
        i = bisect.bisect_right(self.times_s, t_s)
        if i <= 0:
            return values[0]
        if i >= len(self.times_s):
            return values[-1]
        t0, t1 = self.times_s[i - 1], self.times_s[i]
        return values[i - 1] + (values[i] - values[i - 1]) * (t_s - t0) / (t1 - t0)

    def rate_at(self, t_s: float) -> float:
        return self._at(self.rps, t_s)

    def tokens_at(self, t_s: float) -> tuple[float, float] | None:
        """(prompt, output) mean tokens at t_s, or None when the trace does not say."""
        if self.prompt_tokens is None or self.output_tokens is None:
            return None
        return self._at(self.prompt_tokens, t_s), self._at(self.output_tokens, t_s)


def load_trace(path: Path) -> Trace:
    rows: list[list[str]] = []
    header: list[str] | None = None
    with open(path, newline="", encoding="utf-8") as fh:
        for lineno, row in enumerate(csv.reader(fh), start=1):
            if not row or row[0].lstrip().startswith("#"):
                continue
            if header is None:
                header = [cell.strip() for cell in row]
                if header[:2] != ["t_s", "rps"] or header[2:] not in ([], ["prompt_tokens", "output_tokens"]):
                    raise TraceError(f"{path}:{lineno}: header must be t_s,rps[,prompt_tokens,output_tokens], got {row}")
                continue
            if len(row) != len(header):
                raise TraceError(f"{path}:{lineno}: {len(row)} fields, the header has {len(header)}")
            rows.append([*row, str(lineno)])
    if header is None or len(rows) < 2:
        raise TraceError(f"{path}: a header and at least two rows are needed")
    columns: list[list[float]] = [[] for _ in header]
    for row in rows:
        lineno = row[-1]
        for i, cell in enumerate(row[:-1]):
            try:
                value = float(cell)
            except ValueError:
                raise TraceError(f"{path}:{lineno}: {header[i]}={cell!r} is not a number") from None
            if not math.isfinite(value) or value < 0:
                raise TraceError(f"{path}:{lineno}: {header[i]}={cell!r} must be a finite number >= 0")
            columns[i].append(value)
    times = columns[0]
    if times[0] != 0 or any(b <= a for a, b in itertools.pairwise(times)):
        raise TraceError(f"{path}: t_s must start at 0 and increase strictly")
    tokens = (tuple(columns[2]), tuple(columns[3])) if len(header) == 4 else (None, None)
    return Trace(path.stem, tuple(times), tuple(columns[1]), *tokens)


def poisson(rng: random.Random, mean: float) -> int:
    """A Poisson draw: Knuth's method below 30, a rounded normal above (error < 1 %)."""
    if mean <= 0:
        return 0
    if mean < 30:
        limit, k, p = math.exp(-mean), 0, rng.random()
        while p > limit:
            k += 1
            p *= rng.random()
        return k
    return max(0, round(rng.gauss(mean, math.sqrt(mean))))


# --- the sample traces (bench/traces/*.csv) ------------------------------------------


def diurnal_rps(t_s: float, trough: float, peak: float) -> float:
    """Lowest at 04:00, highest at 16:00: a working day seen by one region."""
    phase = 2 * math.pi * (t_s / HOUR_S - 4.0) / 24.0
    return trough + (peak - trough) * (1 - math.cos(phase)) / 2


def _burst(t_s: float, start_h: float, up_s: float, hold_s: float, down_s: float, extra_rps: float) -> float:
    x = t_s - start_h * HOUR_S
    if x < 0 or x > up_s + hold_s + down_s:
        return 0.0
    if x < up_s:
        return extra_rps * x / up_s
    if x < up_s + hold_s:
        return extra_rps
    return extra_rps * (1 - (x - up_s - hold_s) / down_s)


# (start hour, ramp up s, hold s, ramp down s, extra rps)
BURSTS = ((9.5, 120, 1200, 300, 30.0), (13.0, 120, 1800, 300, 40.0), (16.5, 120, 900, 300, 35.0), (20.0, 120, 1500, 300, 25.0))
FLASH_CROWDS = ((8.0, 60, 600, 120, 60.0), (14.0, 60, 600, 120, 60.0), (19.0, 60, 600, 120, 60.0))


def sample_rows(name: str, seed: int = 1) -> list[tuple[float, float]]:
    """Rows of one sample trace: 24 h at 5-minute points (+ the burst edges), ±5 % noise."""
    shapes = {
        "diurnal": (8.0, 70.0, ()),
        "diurnal_bursts": (8.0, 60.0, BURSTS),
        "flash_crowd": (10.0, 40.0, FLASH_CROWDS),
    }
    trough, peak, bursts = shapes[name]
    rng = random.Random(f"{name}:{seed}")
    times = {float(t) for t in range(0, 24 * 3600 + 1, 300)}
    for start_h, up, hold, down, _ in bursts:
        t0 = start_h * HOUR_S
        times.update({t0, t0 + up, t0 + up + hold, t0 + up + hold + down})
    rows = []
    for t in sorted(times):
        noise = 1.0 + 0.05 * rng.gauss(0.0, 1.0)
        rate = diurnal_rps(t, trough, peak) * noise + sum(_burst(t, *b) for b in bursts)
        rows.append((t, round(max(0.0, rate), 3)))
    return rows


SAMPLE_NAMES = ("diurnal", "diurnal_bursts", "flash_crowd")


def write_sample_traces(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name in SAMPLE_NAMES:
        path = directory / f"{name}.csv"
        lines = [f"# {name}: generated by `python -m bench.fleet.trace --write {directory}`; format in bench/fleet/trace.py", "t_s,rps"]
        lines += [f"{t:g},{rps:g}" for t, rps in sample_rows(name)]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, required=True, help="directory to write the sample traces to")
    for path in write_sample_traces(parser.parse_args().write):
        print(path)


if __name__ == "__main__":
    main()
