"""The /status document: every reading with its age, staleness and why it is missing."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Any

from probes.snapshot import Snapshot


def jsonable(value: Any) -> Any:
    """Readings are frozen dataclasses of plain values; make them JSON data."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in value]
    if isinstance(value, float):
        return round(value, 6) if math.isfinite(value) else None
    return value


def describe_reading(snapshot: Snapshot, key: str) -> dict[str, Any]:
    reading = snapshot.get(key)
    if reading is None:
        return {"value": None, "age_s": None, "stale": True, "error": "no reading yet", "error_code": "missing"}
    return {"value": jsonable(reading.value), **reading.describe(snapshot.now())}


def describe_all(snapshot: Snapshot) -> dict[str, Any]:
    return {key: describe_reading(snapshot, key) for key, _ in sorted(snapshot.items())}
