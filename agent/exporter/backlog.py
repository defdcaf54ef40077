"""The exporter's queue: one `Batch` per sample (every series once, one end time),
kept in end-time order and bounded in points. Pure."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from agent.exporter.series import SeriesPoint


@dataclass(slots=True)
class Batch:
    """The points of one sample, all at `end_wall`; `points` shrinks as chunks are written."""

    end_wall: float
    points: list[SeriesPoint]
    written: int = 0


class Backlog:
    """Batches in end-time order, bounded in points; the oldest go first, so what
    is written stays in time order and the newest values survive an outage."""

    def __init__(self, max_points: int) -> None:
        self.max_points = max_points
        self._batches: deque[Batch] = deque()

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def points(self) -> int:
        return sum(len(b.points) for b in self._batches)

    def append(self, batch: Batch) -> None:
        self._batches.append(batch)

    def head(self) -> Batch | None:
        """The oldest batch with points left (written-out batches are let go)."""
        while self._batches and not self._batches[0].points:
            self._batches.popleft()
        return self._batches[0] if self._batches else None

    def trim(self, oldest_wall: float) -> int:
        """Drop batches over the bound or ending before `oldest_wall`; returns the points dropped."""
        dropped, total = 0, self.points
        while self._batches and (total > self.max_points or self._batches[0].end_wall < oldest_wall):
            n = len(self._batches.popleft().points)
            dropped, total = dropped + n, total - n
        return dropped
