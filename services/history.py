"""Metric history reads from chunks: which metrics runs have, keyset pages, downsampling.

Each read is a few statements whatever the number of runs and metrics it covers: pages walk
the chunk key (run, metric, last step) in order with a growing LIMIT, downsampling reads chunk
summaries and then the arrays of the few chunks that straddle a bucket or the range's ends.
Pages are ordered by (run, metric id, step): a keyset cursor never skips or repeats a point,
however many points arrive meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
from sqlalchemy import ColumnElement, bindparam, select, text, tuple_
from sqlalchemy.orm import Session, sessionmaker

from services.chunks import CHUNK_POINTS, Points
from services.db import session_scope
from services.errors import NotFound
from services.models import MetricChunk, MetricName

Key = tuple[int, int]  # (run id, metric id)
Cursor = tuple[int, int, int]  # (run id, metric id, step): the last point delivered


@dataclass(frozen=True)
class Series:
    """Points of one metric of one run, in step order."""

    run_id: int
    metric: str
    points: Points

    def pairs(self) -> list[tuple[int, float]]:
        return list(zip(self.points.steps.tolist(), self.points.values.tolist(), strict=True))


# A loose index scan of the chunk key: one index probe per (run, metric), not one per chunk.
_SERIES_OF = text(
    """
    WITH RECURSIVE s(run_id, metric_id) AS (
        SELECT r.id, (SELECT min(c.metric_id) FROM metric_chunk c WHERE c.run_id = r.id)
        FROM run r WHERE r.id IN :runs
        UNION ALL
        SELECT s.run_id, (SELECT min(c.metric_id) FROM metric_chunk c
                          WHERE c.run_id = s.run_id AND c.metric_id > s.metric_id)
        FROM s WHERE s.metric_id IS NOT NULL
    )
    SELECT s.run_id, n.name, n.id FROM s JOIN metric_name n ON n.id = s.metric_id
    """
).bindparams(bindparam("runs", expanding=True))


def series_of(*, db_session: Session, run_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """run id -> {metric name: metric id} of the metrics each run has points of."""
    out: dict[int, dict[str, int]] = {run_id: {} for run_id in run_ids}
    if run_ids:
        rows = db_session.execute(_SERIES_OF, {"runs": list(run_ids)})
        for run_id, name, metric_id in rows:
            out[run_id][name] = metric_id
    return out


def run_metric_names(*, db_session: Session, run_id: int) -> list[str]:
    return sorted(series_of(db_session=db_session, run_ids=[run_id])[run_id])


def resolve(
    *, db_session: Session, run_ids: Sequence[int], names: Sequence[str] | None, what: str
) -> list[int] | None:
    """The metric ids of ``names`` (None: every metric); NotFound naming each name that none
    of the runs has (``what`` names the runs: "run 3", "sweep 2")."""
    if not names:
        return None
    known: dict[str, int] = {}
    for metrics in series_of(db_session=db_session, run_ids=run_ids).values():
        known |= metrics
    unknown = sorted(set(names) - set(known))
    if unknown:
        has = ", ".join(sorted(known)) or "none yet"
        raise NotFound(
            f"{what} has no metric named {', '.join(map(repr, unknown))} (it has: {has})"
        )
    return sorted({known[name] for name in names})


def metric_names(*, db_session: Session, metric_ids: Sequence[int]) -> dict[int, str]:
    rows = db_session.execute(
        select(MetricName.id, MetricName.name).where(MetricName.id.in_(set(metric_ids)))
    )
    return {id_: name for id_, name in rows}


@dataclass(frozen=True)
class Selection:
    """Which points a read covers: runs, metrics (None: every one), an inclusive step range."""

    run_ids: Sequence[int]
    metric_ids: Sequence[int] | None = None
    start: int | None = None
    end: int | None = None

    def where(self) -> list[ColumnElement[bool]]:
        """The conditions on ``metric_chunk`` of the chunks holding such points."""
        where: list[ColumnElement[bool]] = [MetricChunk.run_id.in_(self.run_ids)]
        if self.metric_ids is not None:
            where.append(MetricChunk.metric_id.in_(self.metric_ids))
        if self.start is not None:
            where.append(MetricChunk.last_step >= self.start)
        if self.end is not None:
            where.append(MetricChunk.first_step <= self.end)
        return where


def read_page(
    *, db_session: Session, selection: Selection, after: Cursor | None, limit: int
) -> tuple[list[Series], Cursor | None]:
    """Up to ``limit`` points ordered by (run, metric id, step), strictly after ``after``, and
    the cursor of the next page (None: this is the last)."""
    where, start, end = selection.where(), selection.start, selection.end
    order = (MetricChunk.run_id, MetricChunk.metric_id, MetricChunk.last_step)
    parts: list[tuple[Key, Points]] = []
    left, fetch, key = limit, limit // CHUNK_POINTS + 2, after
    while True:
        query = select(*order, MetricChunk.step_array, MetricChunk.value_array).where(*where)
        if key is not None:
            query = query.where(tuple_(*order) > tuple_(*key))
        rows = db_session.execute(query.order_by(*order).limit(fetch)).all()
        for run_id, metric_id, last_step, steps, values in rows:
            first = start
            if after is not None and (run_id, metric_id) == after[:2]:
                first = max(start or 0, after[2] + 1)
            points = Points.decode(steps, values).between(first, end)
            if len(points) > left:  # the page ends inside this chunk
                if left:
                    parts.append(((run_id, metric_id), points.where(np.arange(len(points)) < left)))
                (run_id, metric_id), last = parts[-1]
                return _named(db_session, parts), (run_id, metric_id, int(last.steps[-1]))
            if len(points):
                parts.append(((run_id, metric_id), points))
                left -= len(points)
            key = (run_id, metric_id, last_step)
        if len(rows) < fetch:
            return _named(db_session, parts), None
        fetch *= 2


def _named(db_session: Session, parts: list[tuple[Key, Points]]) -> list[Series]:
    """Series of consecutive parts of the same history, joined, with their names."""
    names = metric_names(db_session=db_session, metric_ids=[mid for (_, mid), _ in parts])
    return [
        Series(run_id, names[mid], Points.join([points for _, points in group]))
        for (run_id, mid), group in groupby(parts, key=lambda part: part[0])
    ]


def iter_series(
    *, sessions: sessionmaker[Session], selection: Selection, page_size: int = 50_000
) -> Iterator[Series]:
    """Every point of the runs in page order, a page per short session (no connection is held
    while the caller streams a page out)."""
    after: Cursor | None = None
    while True:
        with session_scope(sessions) as db:
            series, after = read_page(
                db_session=db, selection=selection, after=after, limit=page_size
            )
        yield from series
        if after is None:
            return


# -- downsampling ------------------------------------------------------------------------------

_SUMMARY = (
    MetricChunk.run_id,
    MetricChunk.metric_id,
    MetricChunk.last_step,
    MetricChunk.first_step,
    MetricChunk.first_value,
    MetricChunk.last_value,
    MetricChunk.min_step,
    MetricChunk.min_value,
    MetricChunk.max_step,
    MetricChunk.max_value,
)


def downsample(
    *,
    db_session: Session,
    keys: Sequence[Key],
    start: int | None,
    end: int | None,
    max_points: int,
) -> dict[Key, Points]:
    """Each history of ``keys`` reduced to at most ``max_points`` (≥ 4) points.

    The range is cut into ``max_points // 4`` buckets of equal step width; each keeps its
    first, last, lowest and highest point (M4), so the ends, the minimum and the maximum,
    spikes and divergence (NaN, ±inf) survive any reduction. A chunk no wider than a bucket
    counts in the bucket of its first step with its four summary points; wider chunks and
    those that stick out of the range are read and bucketed point by point. A range with at
    most ``max_points`` steps comes back whole.
    """
    if not keys:
        return {}
    selection = Selection(sorted({r for r, _ in keys}), sorted({m for _, m in keys}), start, end)
    order = (MetricChunk.run_id, MetricChunk.metric_id, MetricChunk.last_step)
    rows = db_session.execute(select(*_SUMMARY).where(*selection.where()).order_by(*order)).all()
    chunks: dict[Key, list[Any]] = {}
    for row in rows:
        chunks.setdefault((row.run_id, row.metric_id), []).append(row)
    plans = {
        key: _Plan(rows, start, end, max_points) for key, rows in chunks.items() if key in keys
    }
    arrays = _arrays(
        db_session, [(*key, row.last_step) for key, plan in plans.items() for row in plan.read]
    )
    out = {}
    for key, plan in plans.items():
        parts = [arrays[(*key, row.last_step)].between(plan.lo, plan.hi) for row in plan.read]
        out[key] = plan.reduce(parts)
    return out


class _Plan:
    """How one history is downsampled: its range and buckets, and which chunks to read."""

    def __init__(self, rows: list[Any], start: int | None, end: int | None, max_points: int):
        self.lo = max(start or 0, rows[0].first_step)
        self.hi = rows[-1].last_step if end is None else min(end, rows[-1].last_step)
        self.whole = self.hi - self.lo + 1 <= max_points
        self.width = -(-(self.hi - self.lo + 1) // max(1, max_points // 4))
        self.read = [row for row in rows if self.whole or not self._summarized(row)]
        self.summarized = [row for row in rows if not self.whole and self._summarized(row)]

    def _summarized(self, row: Any) -> bool:
        inside = self.lo <= row.first_step and row.last_step <= self.hi
        return inside and row.last_step - row.first_step < self.width

    def reduce(self, parts: list[Points]) -> Points:
        """The read points (``parts``) and the summaries, four points per bucket at most."""
        if self.whole:
            return Points.join(parts) if parts else Points.empty()
        nan = float("nan")
        candidates = [
            ((row.first_step, row.first_value), (row.last_step, row.last_value),
             (row.min_step, row.min_value), (row.max_step, row.max_value))
            for row in self.summarized
        ]  # fmt: skip
        steps = [step for four in candidates for step, _ in four]
        values = [nan if v is None else v for four in candidates for _, v in four]
        where = [four[0][0] for four in candidates for _ in four]  # a chunk's bucket: its first
        for part in parts:
            steps += part.steps.tolist()
            values += part.values.tolist()
            where += part.steps.tolist()
        return m4(
            np.array(steps, np.int64), np.array(values), (np.array(where) - self.lo) // self.width
        )


def m4(steps: np.ndarray, values: np.ndarray, buckets: np.ndarray) -> Points:
    """Of points in buckets, each bucket's first, last, lowest and highest (NaN never the
    lowest or highest; ties go to the earlier step), in step order, each point once."""
    keep = np.zeros(len(steps), dtype=bool)
    by_step = np.lexsort((steps, buckets))
    starts = np.r_[True, buckets[by_step][1:] != buckets[by_step][:-1]]
    ends = np.r_[starts[1:], True]
    keep[by_step[starts]] = keep[by_step[ends]] = True
    numbers = np.flatnonzero(~np.isnan(values))
    for sign in (1, -1) if len(numbers) else ():
        order = numbers[np.lexsort((steps[numbers], sign * values[numbers], buckets[numbers]))]
        first = np.r_[True, buckets[order][1:] != buckets[order][:-1]]
        keep[order[first]] = True
    return Points.of(steps[keep], values[keep])


def _arrays(
    db_session: Session, keys: list[tuple[int, int, int]]
) -> dict[tuple[int, int, int], Points]:
    out: dict[tuple[int, int, int], Points] = {}
    chunk_key = tuple_(MetricChunk.run_id, MetricChunk.metric_id, MetricChunk.last_step)
    for i in range(0, len(keys), 1000):  # bound the statement's parameters
        rows = db_session.execute(
            select(
                MetricChunk.run_id,
                MetricChunk.metric_id,
                MetricChunk.last_step,
                MetricChunk.step_array,
                MetricChunk.value_array,
            ).where(chunk_key.in_(keys[i : i + 1000]))
        )
        for run_id, metric_id, last_step, steps, values in rows:
            out[(run_id, metric_id, last_step)] = Points.decode(steps, values)
    return out


def read_downsampled(
    *,
    db_session: Session,
    selection: Selection,
    max_points: int,
    after: Cursor | None = None,
    limit: int | None = None,
) -> tuple[list[Series], Cursor | None]:
    """The selected histories, each downsampled to ``max_points``, in (run, metric id) order
    after the series of ``after``; a page holds whole series, at most ``limit // max_points``
    of them, and the cursor tells where the next page starts."""
    metric_ids = selection.metric_ids
    keys = [
        (run_id, mid)
        for run_id, metrics in series_of(db_session=db_session, run_ids=selection.run_ids).items()
        for mid in metrics.values()
        if metric_ids is None or mid in metric_ids
    ]
    keys = sorted(k for k in keys if after is None or k > after[:2])
    per_page = len(keys) if limit is None else max(1, limit // max_points)
    page, more = keys[:per_page], len(keys) > per_page
    found = downsample(
        db_session=db_session,
        keys=page,
        start=selection.start,
        end=selection.end,
        max_points=max_points,
    )
    series = _named(db_session, [(key, found[key]) for key in page if key in found])
    last = page[-1] if page else None
    return series, (*last, 0) if more and last is not None else None


def run_series(
    *, db_session: Session, run_id: int, names: Sequence[str], max_points: int
) -> dict[str, list[tuple[int, float | None]]]:
    """{metric: [(step, value), …]} of the run's metrics among ``names``, each downsampled to
    ``max_points`` (whole when shorter); NaN is None."""
    metrics = series_of(db_session=db_session, run_ids=[run_id])[run_id]
    wanted = {name: metrics[name] for name in names if name in metrics}
    found = downsample(
        db_session=db_session,
        keys=[(run_id, mid) for mid in wanted.values()],
        start=None,
        end=None,
        max_points=max_points,
    )
    return {
        name: [
            (s, None if v != v else v)
            for s, v in Series(run_id, name, found[(run_id, mid)]).pairs()
        ]
        for name, mid in wanted.items()
        if (run_id, mid) in found
    }
