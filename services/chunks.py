"""Metric histories in the shape of the data: chunks of steps and values with their summary.

A history (one metric of one run) is stored as ``metric_chunk`` rows of up to CHUNK_POINTS
points each: the steps and values as little-endian int64/float64 bytes, plus first/last step,
count, first/last value and the lowest and highest value with their steps. NaN and ±inf are
kept bit for bit in the arrays; in the summary columns NaN is NULL (SQLite cannot hold NaN),
and min/max ignore NaN (both NULL when every value is NaN).

The chunks of one history never overlap in steps, so their key (run, metric, last step) orders
them by step and a read concatenates them. :func:`plan_write` keeps that invariant: a point
inside a stored chunk's step range is merged into that chunk (a stored step keeps its first
value), the others become new chunks between the stored ones, and the points right after a
small chunk (a writer logging a few steps at a time) are appended to it, so chunks stay large.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

CHUNK_POINTS = 1024  # points per chunk at most: a batch's history is cut into pieces this size
SMALL_CHUNK = 256  # a chunk with fewer points takes in the points appended right after it
TAIL_WINDOW = 1024  # how many steps before a batch a writer looks for such a chunk

Steps = npt.NDArray[np.int64]
Values = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Points:
    """Points of one history: steps sorted and unique, values aligned (NaN and ±inf as is)."""

    steps: Steps
    values: Values

    @classmethod
    def of(cls, steps: Any, values: Any) -> Points:
        """From steps in any order; of a repeated step the first value counts."""
        s = np.asarray(steps, dtype=np.int64).reshape(-1)
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        if len(s) and (np.diff(s) > 0).all():
            return cls(s, v)
        unique, first = np.unique(s, return_index=True)
        return cls(unique, v[first])

    @classmethod
    def decode(cls, steps: bytes, values: bytes) -> Points:
        return cls(np.frombuffer(steps, "<i8"), np.frombuffer(values, "<f8"))

    @classmethod
    def empty(cls) -> Points:
        return cls(np.empty(0, np.int64), np.empty(0, np.float64))

    @classmethod
    def join(cls, parts: Sequence[Points]) -> Points:
        """Points of disjoint parts, in step order."""
        if len(parts) == 1:
            return parts[0]
        steps = np.concatenate([p.steps for p in parts])
        values = np.concatenate([p.values for p in parts])
        if (np.diff(steps) > 0).all():  # the parts were in order already (pages, streams)
            return cls(steps, values)
        order = np.argsort(steps, kind="stable")
        return cls(steps[order], values[order])

    def __len__(self) -> int:
        return len(self.steps)

    def where(self, keep: npt.NDArray[np.bool_]) -> Points:
        return Points(self.steps[keep], self.values[keep])

    def between(self, first: int | None, last: int | None) -> Points:
        """The points with first ≤ step ≤ last (None: unbounded)."""
        lo = 0 if first is None else int(np.searchsorted(self.steps, first, "left"))
        hi = len(self) if last is None else int(np.searchsorted(self.steps, last, "right"))
        return Points(self.steps[lo:hi], self.values[lo:hi])

    def pieces(self, size: int = CHUNK_POINTS) -> list[Points]:
        return [
            Points(self.steps[i : i + size], self.values[i : i + size])
            for i in range(0, len(self), size)
        ]

    def summary(self) -> dict[str, Any]:
        """First/last step and value, count, and the lowest/highest value with its step
        (NaN ignored; both None when every value is NaN, and NaN is None throughout)."""
        steps, values = self.steps, self.values
        if np.isnan(values).all():
            lo = hi = 0
        else:
            lo, hi = int(np.nanargmin(values)), int(np.nanargmax(values))  # first of ties
        return {
            "first_step": int(steps[0]),
            "last_step": int(steps[-1]),
            "count": len(steps),
            "first_value": stored(values[0]),
            "last_value": stored(values[-1]),
            "min_step": int(steps[lo]),
            "min_value": stored(values[lo]),
            "max_step": int(steps[hi]),
            "max_value": stored(values[hi]),
        }

    def chunk_row(self) -> dict[str, Any]:
        """The ``metric_chunk`` columns of these points (run_id and metric_id aside)."""
        return self.summary() | {
            "step_array": self.steps.astype("<i8").tobytes(),
            "value_array": self.values.astype("<f8").tobytes(),
        }


def stored(value: Any) -> float | None:
    """A summary value as stored: NaN is NULL."""
    value = float(value)
    return None if value != value else value


@dataclass(frozen=True)
class StoredChunk:
    """A chunk the writer read: its key step range and size, and its points when it needs them."""

    first_step: int
    last_step: int
    count: int
    points: Points | None


@dataclass
class WritePlan:
    """What to write for one history: new chunks, rewritten ones (by their stored last step)."""

    inserts: list[Points]
    updates: list[tuple[int, Points]]
    new: int  # points not stored before


def plan_write(stored_chunks: Sequence[StoredChunk], points: Points) -> WritePlan:
    """How to store ``points`` next to ``stored_chunks`` of the same history.

    ``stored_chunks`` (in step order) must hold every chunk whose range reaches from
    ``points.steps[0] - TAIL_WINDOW`` to ``points.steps[-1]``, with the points of each one that
    overlaps that range or has fewer than SMALL_CHUNK points (``services.metrics`` reads
    exactly those).
    """
    plan = WritePlan([], [], 0)
    firsts = np.array([c.first_step for c in stored_chunks], dtype=np.int64)
    lasts = np.array([c.last_step for c in stored_chunks], dtype=np.int64)
    at = np.searchsorted(firsts, points.steps, "right") - 1  # the chunk starting at or before
    inside = np.zeros(len(points), dtype=bool)
    if len(lasts):
        inside = (at >= 0) & (points.steps <= lasts[np.maximum(at, 0)])
    taken: dict[int, list[Points]] = {}
    for i in np.unique(at[inside]).tolist():
        chunk = stored_chunks[i]
        assert chunk.points is not None, "an overlapped chunk is read with its points"
        part = points.where(inside & (at == i))
        part = part.where(~np.isin(part.steps, chunk.points.steps))  # the stored value wins
        if len(part):
            taken[i] = [part]
    for i in np.unique(at[~inside]).tolist():
        part = points.where(~inside & (at == i))
        if i >= 0 and stored_chunks[i].points is not None and stored_chunks[i].count < SMALL_CHUNK:
            taken.setdefault(i, []).append(part)
        else:
            plan.inserts += part.pieces()
            plan.new += len(part)
    for i, parts in taken.items():
        chunk = stored_chunks[i]
        assert chunk.points is not None
        merged = Points.join([chunk.points, *parts]).pieces()
        plan.updates.append((chunk.last_step, merged[0]))
        plan.inserts += merged[1:]
        plan.new += sum(len(p) for p in parts)
    return plan
