"""Cumulative histograms as Prometheus serves them: bucket deltas, quantiles the way
histogram_quantile computes them, the share within a bound, and goodput."""

from __future__ import annotations

from dataclasses import dataclass

from probes.prom_text import PromParseError


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
        return Histogram(self.bounds, tuple(a - b for a, b in zip(self.cumulative, older.cumulative, strict=True)))

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
    shares = [
        s for h, slo in ((ttft, slo_ttft_s), (tpot, slo_tpot_s)) if h is not None and (s := h.share_at_most(slo)) is not None
    ]
    return min(shares) if shares else None
