"""The one backoff rule: exponential with full jitter. Probes, metadata watchers, the
supervisor, the exporter and the drain persistence all wait with it."""

from __future__ import annotations

import random


def backoff_s(failures: int, base_s: float, cap_s: float, rng: random.Random | None = None) -> float:
    """Exponential backoff with full jitter in [base, min(cap, base * 2**n)]."""
    if failures <= 0:
        return base_s
    top = min(cap_s, base_s * (2 ** min(failures, 16)))
    return (rng or random).uniform(base_s, max(base_s, top))
