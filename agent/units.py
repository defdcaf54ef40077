"""Numbers as an SRE reads them in `gpu-node-agent status`: every figure with its unit,
integers as integers, "-" for a missing value, and lines wrapped to 100 columns.
Standard library only (the CLI must start fast)."""

from __future__ import annotations

import math
import textwrap
from typing import Any

WIDTH = 100
LABEL_WIDTH = 12


def _finite(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def num(value: Any, decimals: int = 1) -> str:
    """4.0 -> "4", 0.318 -> "0.3" (decimals=1); None -> "-"."""
    v = _finite(value)
    if v is None:
        return "-"
    if v.is_integer() or abs(v) >= 100:
        return f"{v:.0f}"
    text = f"{v:.{decimals}f}".rstrip("0").rstrip(".")
    return text if text not in ("0", "-0") or v == 0 else f"{v:.{decimals + 2}f}".rstrip("0")


def count(value: Any) -> str:
    """Request counts are whole: 15.0 -> "15"."""
    v = _finite(value)
    return "-" if v is None else f"{v:.0f}"


def secs(value: Any) -> str:
    """Seconds for people: "< 0.1 s", "0.4 s", "21 s", "3 min 20 s", "12 min", "2 h 5 min", "3 d 4 h"."""
    v = _finite(value)
    if v is None:
        return "-"
    if v < 0.1:
        return "0 s" if v <= 0 else "< 0.1 s"
    if v < 10:
        return f"{v:.1f}".removesuffix(".0") + " s"
    if v < 120:
        return f"{v:.0f} s"
    minutes, seconds = divmod(round(v), 60)
    if minutes < 10:
        return f"{minutes} min" + (f" {seconds} s" if seconds else "")
    hours, minutes = divmod(minutes, 60)
    if hours == 0:
        return f"{minutes} min"
    days, hours = divmod(hours, 24)
    if days == 0:
        return f"{hours} h" + (f" {minutes} min" if minutes else "")
    return f"{days} d" + (f" {hours} h" if hours else "")


def _scaled(value: Any, factor: float, unit: str) -> str:
    v = _finite(value)
    return "-" if v is None else f"{v * factor:.0f} {unit}"


def ratio_pct(value: Any) -> str:
    """A 0-1 ratio as a percentage."""
    return _scaled(value, 100, "%")


def pct(value: Any) -> str:
    """A value that already is a percentage."""
    return _scaled(value, 1, "%")


def ms(seconds: Any) -> str:
    return _scaled(seconds, 1000, "ms")


def mb(nbytes: Any) -> str:
    return _scaled(nbytes, 1e-6, "MB")


def gb(nbytes: Any) -> str:
    """Gigabytes keep a decimal: 0.5 GB of host memory is worth telling from 0."""
    v = _finite(nbytes)
    return "-" if v is None else f"{num(v / 1e9)} GB"


def plain(value: Any) -> str:
    """Any JSON value as words, never a Python repr: yes/no, "-", "a, b", "key value"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return num(value, 2)
    if isinstance(value, (list, tuple)):
        return ", ".join(plain(v) for v in value) or "none"
    if isinstance(value, dict):
        parts = [f"{k} {plain(v)}" for k, v in value.items() if v not in (None, "", [], {})]
        return ", ".join(parts) or "-"
    return str(value)


def row(label: str, text: str) -> list[str]:
    """`label` in its column and `text` wrapped beside it, continuation lines indented."""
    indent = " " * LABEL_WIDTH
    return textwrap.wrap(text, WIDTH, initial_indent=f"{label:<{LABEL_WIDTH - 1}} ", subsequent_indent=indent,
                         break_on_hyphens=False) or [label]


def bullet(text: str, mark: str = "!") -> list[str]:
    """An item of a block: `  ! text`, continuation lines indented under the text."""
    first = f"  {mark} " if mark else "  "
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent="    ", break_on_hyphens=False)


def fit(text: str, width: int = WIDTH) -> str:
    """One line that must stay one line (the headline): cut with an ellipsis."""
    return text if len(text) <= width else text[: width - 3].rstrip() + "..."
