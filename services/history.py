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


def _where(
    run_ids: Sequence[int], metric_ids: Sequence[int] | None, start: int | None, end: int | None
) -> list[Any]:
    where: list[ColumnElement[bool]] = [MetricChunk.run_id.in_(run_ids)]
    if metric_ids is not None:
        where.append(MetricChunk.metric_id.in_(metric_ids))
    if start is not None:
        where.append(MetricChunk.last_step >= start)
    if end is not None:
        where.append(MetricChunk.first_step <= end)
    return where


def read_page(
    *,
    db_session: Session,
    run_ids: Sequence[int],
    metric_ids: Sequence[int] | None,
    start: int | None,
    end: int | None,
    after: Cursor | None,
    limit: int,
) -> tuple[list[Series], Cursor | None]:
    """Up to ``limit`` points ordered by (run, metric id, step), strictly after ``after``, and
    the cursor of the next page (None: this is the last)."""
    where = _where(run_ids, metric_ids, start, end)
    parts: list[tuple[Key, Points]] = []
    got, fetch, key = 0, limit // CHUNK_POINTS + 2, after
    while got <= limit:
        query = select(
            MetricChunk.run_id,
            MetricChunk.metric_id,
            MetricChunk.last_step,
            MetricChunk.step_array,
            MetricChunk.value_array,
        ).where(*where)
        if key is not None:
            chunk_key = tuple_(MetricChunk.run_id, MetricChunk.metric_id, MetricChunk.last_step)
            query = query.where(chunk_key > tuple_(*key))
        order = (MetricChunk.run_id, MetricChunk.metric_id, MetricChunk.last_step)
        rows = db_session.execute(query.order_by(*order).limit(fetch)).all()
        for run_id, metric_id, last_step, steps, values in rows:
            first = start
            if after is not None and (run_id, metric_id) == after[:2]:
                first = after[2] + 1 if start is None else max(start, after[2] + 1)
            points = Points.decode(steps, values).between(first, end)
            parts.append(((run_id, metric_id), points))
            got += len(points)
            key = (run_id, metric_id, last_step)
        if len(rows) < fetch:
            break
        fetch *= 2
    series, next_cursor = _cut(parts, limit)
    return _named(db_session, series), next_cursor


def _cut(
    parts: list[tuple[Key, Points]], limit: int
) -> tuple[list[tuple[Key, Points]], Cursor | None]:
    """The first ``limit`` points of ``parts`` joined per series; the cursor if more remain."""
    out: list[tuple[Key, list[Points]]] = []
    left = limit
    for key, points in parts:
        if not len(points):
            continue
        if left == 0:
            last_key, last = out[-1][0], out[-1][1][-1]
            return [(k, Points.join(p)) for k, p in out], (*last_key, int(last.steps[-1]))
        taken = Points(points.steps[:left], points.values[:left])
        if out and out[-1][0] == key:
            out[-1][1].append(taken)
        else:
            out.append((key, [taken]))
        left -= len(taken)
        if len(taken) < len(points):
            return [(k, Points.join(p)) for k, p in out], (*key, int(taken.steps[-1]))
    return [(k, Points.join(p)) for k, p in out], None


def _named(db_session: Session, series: list[tuple[Key, Points]]) -> list[Series]:
    names = metric_names(db_session=db_session, metric_ids=[mid for (_, mid), _ in series])
    return [Series(run_id, names[mid], points) for (run_id, mid), points in series]


def iter_series(
    *,
    sessions: sessionmaker[Session],
    run_ids: Sequence[int],
    metric_ids: Sequence[int] | None,
    start: int | None,
    end: int | None,
    page_size: int = 50_000,
) -> Iterator[Series]:
    """Every point of the runs in page order, a page per short session (no connection is held
    while the caller streams a page out)."""
    after: Cursor | None = None
    while True:
        with session_scope(sessions) as db:
            series, after = read_page(
                db_session=db,
                run_ids=run_ids,
                metric_ids=metric_ids,
                start=start,
                end=end,
                after=after,
                limit=page_size,
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
Summary = tuple[int, Any, int, Any, int, Any, int, Any]  # first, last, min, max: (step, value)


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
    counts whole in the bucket of its first step (its stored summary is the bucket's part);
    wider chunks and those that stick out of the range are read and split point by point. A
    range with at most ``max_points`` steps comes back whole.
    """
    if not keys:
        return {}
    run_ids, metric_ids = sorted({r for r, _ in keys}), sorted({m for _, m in keys})
    order = (MetricChunk.run_id, MetricChunk.metric_id, MetricChunk.last_step)
    rows = db_session.execute(
        select(*_SUMMARY).where(*_where(run_ids, metric_ids, start, end)).order_by(*order)
    ).all()
    chunks: dict[Key, list[Any]] = {key: [] for key in keys}
    for row in rows:
        if (row.run_id, row.metric_id) in chunks:
            chunks[(row.run_id, row.metric_id)].append(row)
    lo_of = {key: max(start or 0, rows[0].first_step) for key, rows in chunks.items() if rows}
    hi_of = {
        key: min(end, rows[-1].last_step) if end is not None else rows[-1].last_step
        for key, rows in chunks.items()
        if rows
    }
    groups = max(1, max_points // 4)
    width = {key: -(-(hi_of[key] - lo_of[key] + 1) // groups) for key in lo_of}
    whole = {key for key in lo_of if hi_of[key] - lo_of[key] + 1 <= max_points}
    read = [
        (row.run_id, row.metric_id, row.last_step)
        for key in lo_of
        for row in chunks[key]
        if key in whole
        or row.first_step < lo_of[key]
        or row.last_step > hi_of[key]
        or row.last_step - row.first_step >= width[key]
    ]
    arrays = _arrays(db_session, read)
    out: dict[Key, Points] = {}
    for key in lo_of:
        lo, hi = lo_of[key], hi_of[key]
        if key in whole:
            parts = [arrays[(*key, row.last_step)].between(lo, hi) for row in chunks[key]]
            out[key] = Points.join(parts) if parts else Points.empty()
            continue
        buckets: dict[int, Summary] = {}
        for row in chunks[key]:
            points = arrays.get((*key, row.last_step))
            if points is None:
                _fold(buckets, (row.first_step - lo) // width[key], _stored_summary(row))
            else:
                points = points.between(lo, hi)
                index = (points.steps - lo) // width[key]
                for bucket in np.unique(index).tolist():
                    _fold(buckets, bucket, _summary(points.where(index == bucket)))
        out[key] = _points_of(buckets.values())
    return out


def _arrays(db_session: Session, keys: list[tuple[int, int, int]]) -> dict[tuple, Points]:
    out: dict[tuple, Points] = {}
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


def _stored_summary(row: Any) -> Summary:
    """A chunk's summary columns; NULL is NaN (a min or max NULL: every value is NaN)."""
    return (
        row.first_step,
        row.first_value,
        row.last_step,
        row.last_value,
        row.min_step,
        row.min_value,
        row.max_step,
        row.max_value,
    )


def _summary(points: Points) -> Summary:
    row = points.summary()
    return (
        row["first_step"],
        row["first_value"],
        row["last_step"],
        row["last_value"],
        row["min_step"],
        row["min_value"],
        row["max_step"],
        row["max_value"],
    )


def _fold(buckets: dict[int, Summary], bucket: int, new: Summary) -> None:
    """Merge ``new`` into the bucket's summary: the earliest first, the latest last, the
    lowest and highest numbers (a number beats NaN; ties go to the earlier step)."""
    old = buckets.get(bucket)
    if old is None:
        buckets[bucket] = new
        return
    first = old[0:2] if old[0] <= new[0] else new[0:2]
    last = old[2:4] if old[2] >= new[2] else new[2:4]
    low = _better(old[4:6], new[4:6], lambda a, b: a < b)
    high = _better(old[6:8], new[6:8], lambda a, b: a > b)
    buckets[bucket] = (*first, *last, *low, *high)


def _better(a: tuple, b: tuple, beats: Any) -> tuple:
    if a[1] is None or b[1] is None:
        if a[1] is None and b[1] is None:
            return a if a[0] <= b[0] else b
        return b if a[1] is None else a
    if beats(b[1], a[1]) or (b[1] == a[1] and b[0] < a[0]):
        return b
    return a


def _points_of(summaries: Any) -> Points:
    chosen: dict[int, float] = {}
    for first, fv, last, lv, low, lowv, high, highv in summaries:
        for step, value in ((first, fv), (last, lv), (low, lowv), (high, highv)):
            chosen[step] = np.nan if value is None else value
    steps = sorted(chosen)
    return Points(np.array(steps, dtype=np.int64), np.array([chosen[s] for s in steps]))


def read_downsampled(
    *,
    db_session: Session,
    run_ids: Sequence[int],
    metric_ids: Sequence[int] | None,
    start: int | None,
    end: int | None,
    max_points: int,
    after: Cursor | None = None,
    limit: int | None = None,
) -> tuple[list[Series], Cursor | None]:
    """The runs' histories (of ``metric_ids``, or all), each downsampled to ``max_points``,
    in (run, metric id) order after the series of ``after``; a page holds whole series, at
    most ``limit // max_points`` of them, and the cursor tells where the next page starts."""
    keys = [
        (run_id, mid)
        for run_id, metrics in series_of(db_session=db_session, run_ids=run_ids).items()
        for mid in metrics.values()
        if metric_ids is None or mid in metric_ids
    ]
    keys = sorted(k for k in keys if after is None or k > after[:2])
    per_page = len(keys) if limit is None else max(1, limit // max_points)
    page, more = keys[:per_page], len(keys) > per_page
    found = downsample(
        db_session=db_session, keys=page, start=start, end=end, max_points=max_points
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
