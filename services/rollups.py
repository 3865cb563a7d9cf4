"""Multi-resolution min/max rollups of metric histories, and downsampling with them.

For every stored point, each of ``ROLLUP_LEVELS`` levels keeps the lowest and highest point of
the point's bucket of ``2**(5 + 3 L)`` steps (32, 256, 2048, … steps) in ``metric_rollup``,
so a 1M-point history is summarized by reading a few thousand rows instead of a million.
Merging is a min/max, so it commutes and is idempotent: batches may arrive in any order, and
merging a point twice changes nothing.

A batch's summaries are computed with numpy from its new points. On SQLite they are upserted
in the batch's transaction. On PostgreSQL the transaction only inserts them as one
``metric_rollup_pending`` row, and :func:`merge_pending` (run by
:class:`services.metrics.DeferredWriter`, a thread in every process that writes metrics, woken
after each commit) folds pending rows into ``metric_rollup`` with one statement per round, many
batches at a time. A read that uses the rollups first merges what
is pending of its run (:func:`settle`), so it never misses a committed point.

Downsampling is min/max per bucket (M4 without each bucket's first and last point, which a
line plot does not need to show spikes and divergence): the step range is cut into equal-width
groups of consecutive rollup buckets, each contributing its lowest and highest point, plus the
first and last point of the range. Buckets that stick out of the requested range are
summarized from the points themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from services.db import array_literal, driver_connection, side_engine
from services.models import Metric, MetricRollup

if TYPE_CHECKING:
    from services.metrics import Columns

ROLLUP_LEVELS = 12
FIRST_SHIFT, LEVEL_SHIFT = 5, 3  # level L buckets steps by step >> (5 + 3 L)

Row = tuple[int, int, float | None]  # (metric id, step, stored value: None is NaN)
Point = tuple[int, float | None]  # (step, stored value)
Summary = list[Any]  # [min_step, min_value, max_step, max_value]


def rollup_shift(level: int) -> int:
    return FIRST_SHIFT + LEVEL_SHIFT * level


# -- maintenance -------------------------------------------------------------------------------


def _lower(value: float | None, step: int, best_value: float | None, best_step: int) -> bool:
    """Is (value, step) a better minimum than the best so far? NaN (None) loses to numbers."""
    if value is None:
        return best_value is None and step < best_step
    return best_value is None or value < best_value or (value == best_value and step < best_step)


def _higher(value: float | None, step: int, best_value: float | None, best_step: int) -> bool:
    if value is None:
        return best_value is None and step < best_step
    return best_value is None or value > best_value or (value == best_value and step < best_step)


def merge(into: Summary, other: Summary) -> None:
    """Fold ``other``'s minimum and maximum into ``into`` (ties go to the lower step)."""
    if _lower(other[1], other[0], into[1], into[0]):
        into[0], into[1] = other[0], other[1]
    if _higher(other[3], other[2], into[3], into[2]):
        into[2], into[3] = other[2], other[3]


def _first_level(columns: Columns) -> dict[tuple[int, int], Summary]:
    """Level-0 summaries of ``columns`` (sorted by metric id, step), computed per bucket by
    numpy: a bucket's points are consecutive."""
    if not len(columns):
        return {}
    mids, steps, values = columns.metric_ids, columns.steps, columns.values
    buckets = steps >> FIRST_SHIFT
    starts_mask = np.ones(len(steps), dtype=bool)
    starts_mask[1:] = (mids[1:] != mids[:-1]) | (buckets[1:] != buckets[:-1])
    starts = np.flatnonzero(starts_mask)
    segment = np.cumsum(starts_mask) - 1  # each point's bucket, numbered from 0
    nan = np.isnan(values)
    # NaN loses to every number (±inf included) and wins only in a bucket of NaN only.
    any_number = np.logical_or.reduceat(~nan, starts)[segment]
    eligible = ~nan | ~any_number
    low = np.where(nan, np.inf, values)
    high = np.where(nan, -np.inf, values)
    is_min = eligible & (low == np.minimum.reduceat(low, starts)[segment])
    is_max = eligible & (high == np.maximum.reduceat(high, starts)[segment])
    # The first candidate of each bucket: ties go to the lower step.
    lo, hi = np.flatnonzero(is_min), np.flatnonzero(is_max)
    lo = lo[np.unique(segment[lo], return_index=True)[1]]
    hi = hi[np.unique(segment[hi], return_index=True)[1]]
    keys = zip(mids[starts].tolist(), buckets[starts].tolist(), strict=True)
    extremes = zip(
        steps[lo].tolist(),
        values[lo].tolist(),
        steps[hi].tolist(),
        values[hi].tolist(),
        strict=True,
    )
    # v != v: NaN, stored as NULL.
    return {
        key: [a, None if b != b else b, c, None if d != d else d]
        for key, (a, b, c, d) in zip(keys, extremes, strict=True)
    }


def rollup_summaries(columns: Columns) -> dict[tuple[int, int, int], Summary]:
    """(metric id, level, bucket) -> summary of the points in ``columns``."""
    level = _first_level(columns)
    out = {(mid, 0, bucket): summary for (mid, bucket), summary in level.items()}
    for lvl in range(1, ROLLUP_LEVELS):
        parent: dict[tuple[int, int], Summary] = {}
        for (mid, bucket), summary in level.items():
            key = (mid, bucket >> LEVEL_SHIFT)
            if key in parent:
                merge(parent[key], summary)
            else:
                parent[key] = list(summary)
        level = parent
        out |= {(mid, lvl, bucket): summary for (mid, bucket), summary in level.items()}
    return out


def _better(kind: str, op: str) -> str:
    new, old = f"excluded.{kind}", f"r.{kind}"
    new_step, old_step = f"excluded.{kind[:3]}_step", f"r.{kind[:3]}_step"
    return (
        f"(({new} IS NOT NULL AND ({old} IS NULL OR {new} {op} {old} "
        f"OR ({new} = {old} AND {new_step} < {old_step}))) "
        f"OR ({new} IS NULL AND {old} IS NULL AND {new_step} < {old_step}))"
    )


_LOWER, _HIGHER = _better("min_value", "<"), _better("max_value", ">")
# Every SET expression reads the old row (both dialects), so each pair moves together; rows
# whose extremes do not change are not rewritten at all (most of the coarse ones, usually).
_ON_CONFLICT = f"""
    ON CONFLICT (run_id, metric_id, level, bucket) DO UPDATE SET
        min_step = CASE WHEN {_LOWER} THEN excluded.min_step ELSE r.min_step END,
        min_value = CASE WHEN {_LOWER} THEN excluded.min_value ELSE r.min_value END,
        max_step = CASE WHEN {_HIGHER} THEN excluded.max_step ELSE r.max_step END,
        max_value = CASE WHEN {_HIGHER} THEN excluded.max_value ELSE r.max_value END
    WHERE {_LOWER} OR {_HIGHER}
"""
_COLUMNS = "(run_id, metric_id, level, bucket, min_step, min_value, max_step, max_value)"
_UPSERT_POSTGRESQL = (
    f"INSERT INTO metric_rollup AS r {_COLUMNS} SELECT %s, * FROM unnest("
    "%s::int4[], %s::int2[], %s::int8[], %s::int8[], %s::float8[], %s::int8[], %s::float8[])"
    + _ON_CONFLICT
)
_UPSERT_SQLITE = (
    f"INSERT INTO metric_rollup AS r {_COLUMNS} VALUES (?, ?, ?, ?, ?, ?, ?, ?)" + _ON_CONFLICT
)


_PENDING_INSERT = (
    "INSERT INTO metric_rollup_pending (run_id, metric_ids, levels, buckets, min_steps, "
    "min_values, max_steps, max_values) VALUES (%s, %s::int4[], %s::int2[], %s::int8[], "
    "%s::int8[], %s::float8[], %s::int8[], %s::float8[])"
)


def merge_rollups(
    *, db_session: Session, run_id: int, columns: Columns, defer: bool = True
) -> None:
    """Merge ``columns`` (new points) into the run's rollups, in the caller's transaction.

    One upsert, rows in key order, so concurrent writers cannot deadlock; on PostgreSQL, unless
    ``defer`` is false, one row of ``metric_rollup_pending`` holding the batch's summaries
    instead, merged later by :func:`merge_pending` (the upsert of every level cost about as
    much as the rest of a batch's statements); reads that use rollups merge it first.
    """
    if not len(columns):
        return
    summaries = sorted(rollup_summaries(columns).items())
    if db_session.get_bind().dialect.name == "postgresql":
        table: list[list[Any]] = [[] for _ in range(7)]
        for (mid, level, bucket), summary in summaries:
            for column, value in zip(table, (mid, level, bucket, *summary), strict=True):
                column.append(value)
        raw = driver_connection(db_session)
        with raw.cursor() as cur:
            params = (run_id, *(array_literal(column) for column in table))
            # Prepared: planning either statement costs more than running it on a batch.
            cur.execute(_PENDING_INSERT if defer else _UPSERT_POSTGRESQL, params, prepare=True)
    else:
        db_session.connection().exec_driver_sql(
            _UPSERT_SQLITE,
            [(run_id, mid, level, bucket, *summary) for (mid, level, bucket), summary in summaries],
        )


def _merge_pending_sql(one_run: bool) -> str:
    """Claim pending rows (oldest first), fold their summaries per key, upsert, delete them.

    The background merger skips rows another merger holds; a read settling one run waits for
    them instead, so that once it returns every batch committed before it is merged. Per key,
    the lowest point is the lowest value (NaN, stored NULL, last) and then the lower step.
    """
    if one_run:
        claim = "WHERE run_id = %(run_id)s ORDER BY id LIMIT %(limit)s FOR UPDATE"
    else:
        claim = "ORDER BY id LIMIT %(limit)s FOR UPDATE SKIP LOCKED"
    key = "run_id, metric_id, level, bucket"
    return f"""
        WITH claimed AS (
            DELETE FROM metric_rollup_pending
            WHERE id IN (SELECT id FROM metric_rollup_pending {claim})
            RETURNING run_id, metric_ids, levels, buckets, min_steps, min_values, max_steps,
                      max_values
        ), summaries AS (
            SELECT c.run_id, u.*
            FROM claimed AS c, unnest(c.metric_ids, c.levels, c.buckets, c.min_steps,
                                      c.min_values, c.max_steps, c.max_values)
                AS u(metric_id, level, bucket, min_step, min_value, max_step, max_value)
        ), lows AS (
            SELECT DISTINCT ON ({key}) {key}, min_step, min_value FROM summaries
            ORDER BY {key}, min_value ASC NULLS LAST, min_step
        ), highs AS (
            SELECT DISTINCT ON ({key}) {key}, max_step, max_value FROM summaries
            ORDER BY {key}, max_value DESC NULLS LAST, max_step
        ), merged AS (
            INSERT INTO metric_rollup AS r {_COLUMNS}
            SELECT {key}, lows.min_step, lows.min_value, highs.max_step, highs.max_value
            FROM lows JOIN highs USING ({key})
            ORDER BY {key}
            {_ON_CONFLICT}
        )
        SELECT count(*) FROM claimed
    """


_MERGE_ALL, _MERGE_RUN = _merge_pending_sql(False), _merge_pending_sql(True)


def merge_pending(engine: Engine, run_id: int | None = None, limit: int = 200) -> int:
    """Merge pending rollups (of ``run_id`` only, if given) until none is left; how many
    batches were merged. Each round is a transaction of its own. No-op on SQLite."""
    if engine.dialect.name != "postgresql":
        return 0
    merged = 0
    with side_engine(engine).connect() as conn:
        while True:
            with conn.begin():
                sql = _MERGE_ALL if run_id is None else _MERGE_RUN
                count = conn.exec_driver_sql(sql, {"run_id": run_id, "limit": limit}).scalar()
            merged += count or 0
            if not count or count < limit:
                return merged


def settle(db_session: Session, run_id: int) -> None:
    """Merge what is pending of ``run_id`` before its rollups are read (PostgreSQL)."""
    engine = db_session.get_bind()
    if not isinstance(engine, Engine) or engine.dialect.name != "postgresql":
        return
    raw = driver_connection(db_session)
    sql = "SELECT EXISTS (SELECT 1 FROM metric_rollup_pending WHERE run_id = %s)"
    if raw.execute(sql, (run_id,)).fetchone()[0]:
        merge_pending(engine, run_id)


# -- downsampling ------------------------------------------------------------------------------


def series(
    db_session: Session,
    run_id: int,
    metric_id: int,
    first: int | None,
    last: int | None,
    limit: int | None = None,
    descending: bool = False,
) -> list[Point]:
    """(step, stored value) of one metric with first ≤ step ≤ last, in step order.

    One range scan of the (run_id, metric_id, step) primary key, read through the driver's
    own cursor: building SQLAlchemy rows would take several times longer than the query.
    """
    mark = "%s" if db_session.get_bind().dialect.name == "postgresql" else "?"
    sql = f"SELECT step, value FROM metric WHERE run_id = {mark} AND metric_id = {mark}"
    params: list[int] = [run_id, metric_id]
    if first is not None:
        sql += f" AND step >= {mark}"
        params.append(first)
    if last is not None:
        sql += f" AND step <= {mark}"
        params.append(last)
    sql += " ORDER BY step DESC" if descending else " ORDER BY step"
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    raw = driver_connection(db_session)
    rows: list[Point] = raw.execute(sql, params).fetchall()
    return rows


def downsample(
    *,
    db_session: Session,
    run_id: int,
    metric_id: int,
    start: int | None,
    end: int | None,
    max_points: int,
) -> list[Point]:
    """At most ``max_points`` (≥ 4) points of one metric with start ≤ step ≤ end, in step order.

    The range between its first and last point is cut into at most ``(max_points - 2) // 2``
    groups of equal step width; each contributes its lowest and highest point (a group of NaN
    only: its first point), and the first and last points are always kept. So the minimum and
    the maximum, spikes and divergence (NaN, ±inf) survive any reduction. A range with fewer
    steps than ``max_points`` comes back whole.
    """
    head = series(db_session, run_id, metric_id, start, end, 1)
    if not head:
        return []
    tail = series(db_session, run_id, metric_id, start, end, 1, descending=True)
    lo, hi = head[0][0], tail[0][0]
    if hi - lo < max_points:  # never more points than steps
        return series(db_session, run_id, metric_id, lo, hi)
    groups = max(1, (max_points - 2) // 2)
    level = choose_level(lo, hi, groups)
    if level is None:
        points = series(db_session, run_id, metric_id, lo, hi)
        summaries = _group_points(points, lo, hi, groups)
    else:
        settle(db_session, run_id)
        summaries = _group_rollups(db_session, run_id, metric_id, lo, hi, groups, level)
    out = {lo: head[0][1], hi: tail[0][1]}
    for min_step, min_value, max_step, max_value in summaries:
        out[min_step] = min_value
        out[max_step] = max_value
    return sorted(out.items())


def choose_level(lo: int, hi: int, groups: int) -> int | None:
    """The finest level with at most 8 buckets per group over [lo, hi]; None: read the points.

    With at most 32 steps per group the points themselves are few enough to read.
    """
    if hi - lo + 1 <= groups << FIRST_SHIFT:
        return None
    for level in range(ROLLUP_LEVELS):
        shift = rollup_shift(level)
        if (hi >> shift) - (lo >> shift) + 1 <= groups << LEVEL_SHIFT:
            return level
    return ROLLUP_LEVELS - 1


def _group_points(points: Sequence[Point], lo: int, hi: int, groups: int) -> list[Summary]:
    width = -(-(hi - lo + 1) // groups)
    out: dict[int, Summary] = {}
    for step, value in points:
        key = (step - lo) // width
        if key in out:
            merge(out[key], [step, value, step, value])
        else:
            out[key] = [step, value, step, value]
    return list(out.values())


def _group_rollups(
    db_session: Session,
    run_id: int,
    metric_id: int,
    lo: int,
    hi: int,
    groups: int,
    level: int,
) -> list[Summary]:
    """Groups of consecutive buckets of ``level``; edge buckets from the points."""
    shift = rollup_shift(level)
    first_bucket, last_bucket = lo >> shift, hi >> shift
    per_group = -(-(last_bucket - first_bucket + 1) // groups)
    # A bucket that sticks out of [lo, hi] may hold points outside the range: its part inside
    # is read from the points (two buckets at most, each a small part of a group).
    lo_edge = lo != first_bucket << shift
    hi_edge = hi != ((last_bucket + 1) << shift) - 1
    if first_bucket == last_bucket:
        return _group_points(series(db_session, run_id, metric_id, lo, hi), lo, hi, 1)
    buckets: list[tuple[int, Summary]] = []
    if lo_edge:
        edge = series(db_session, run_id, metric_id, lo, ((first_bucket + 1) << shift) - 1)
        buckets += [(first_bucket, s) for s in _group_points(edge, lo, hi, 1)]
    inner_first, inner_last = first_bucket + lo_edge, last_bucket - hi_edge
    if inner_first <= inner_last:
        rows = db_session.execute(
            select(
                MetricRollup.bucket,
                MetricRollup.min_step,
                MetricRollup.min_value,
                MetricRollup.max_step,
                MetricRollup.max_value,
            )
            .where(
                MetricRollup.run_id == run_id,
                MetricRollup.metric_id == metric_id,
                MetricRollup.level == level,
                MetricRollup.bucket.between(inner_first, inner_last),
            )
            .order_by(MetricRollup.bucket)
        )
        buckets += [(bucket, [a, b, c, d]) for bucket, a, b, c, d in rows]
    if hi_edge:
        edge = series(db_session, run_id, metric_id, last_bucket << shift, hi)
        buckets += [(last_bucket, s) for s in _group_points(edge, lo, hi, 1)]
    out: dict[int, Summary] = {}
    for bucket, summary in buckets:
        key = (bucket - first_bucket) // per_group
        if key in out:
            merge(out[key], summary)
        else:
            out[key] = list(summary)
    return list(out.values())


def downsample_raw_sql(
    *, db_session: Session, run_id: int, metric_id: int, lo: int, hi: int, max_points: int
) -> list[tuple[Any, ...]]:
    """The groups :func:`downsample` uses, min and max computed from every point in SQL.

    The benchmark's floor: what a server without rollups would have to run.
    """
    groups = max(1, (max_points - 2) // 2)
    level = choose_level(lo, hi, groups)
    if level is None:
        group = (Metric.step - lo) // -(-(hi - lo + 1) // groups)
    else:
        shift = rollup_shift(level)
        per_group = -(-((hi >> shift) - (lo >> shift) + 1) // groups)
        group = (Metric.step // (1 << shift) - (lo >> shift)) // per_group
    query = (
        select(group, func.min(Metric.value), func.max(Metric.value))
        .where(Metric.run_id == run_id, Metric.metric_id == metric_id)
        .where(Metric.step.between(lo, hi))
        .group_by(group)
    )
    return list(db_session.execute(query).tuples())
