"""Multi-resolution min/max rollups of metric histories, and downsampling with them.

For every stored point, each of ``ROLLUP_LEVELS`` levels keeps the lowest and highest point of
the point's bucket of ``2**(5 + 3 L)`` steps (32, 256, 2048, … steps) in ``metric_rollup``.
Ingestion merges each batch's new points into those rows in the same transaction, in one more
statement, so a 1M-point history is summarized by reading a few thousand rows instead of a
million. Merging is a min/max, so it commutes and is idempotent: batches may arrive in any
order, and merging a point twice changes nothing.

Downsampling is min/max per bucket (M4 without each bucket's first and last point, which a
line plot does not need to show spikes and divergence): the step range is cut into equal-width
groups of consecutive rollup buckets, each contributing its lowest and highest point, plus the
first and last point of the range. Buckets that stick out of the requested range are
summarized from the points themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.db import driver_connection
from services.models import Metric, MetricRollup

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


def _first_level(rows: Sequence[Row]) -> dict[tuple[int, int], Summary]:
    """Level-0 summaries of ``rows``, which are sorted by (metric id, step)."""
    out: dict[tuple[int, int], Summary] = {}
    current: Summary = []
    key = None
    for mid, step, value in rows:
        bucket = step >> FIRST_SHIFT
        if key is None or key[0] != mid or key[1] != bucket:
            key = (mid, bucket)
            current = out[key] = [step, value, step, value]
        elif value is not None:  # steps ascend: an equal value never replaces a summary
            if current[1] is None or value < current[1]:
                current[0], current[1] = step, value
            if current[3] is None or value > current[3]:
                current[2], current[3] = step, value
    return out


def rollup_rows(rows: Sequence[Row]) -> dict[tuple[int, int, int], Summary]:
    """(metric id, level, bucket) -> summary of ``rows`` (sorted by metric id, step)."""
    level = _first_level(rows)
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


def merge_rollups(*, db_session: Session, run_id: int, rows: Sequence[Row]) -> None:
    """Merge ``rows`` (new points, sorted by metric id and step) into the run's rollups.

    One statement; rows are upserted in key order, so concurrent writers cannot deadlock.
    """
    if not rows:
        return
    summaries = sorted(rollup_rows(rows).items())
    if db_session.get_bind().dialect.name == "postgresql":
        columns: list[list[Any]] = [[] for _ in range(7)]
        for (mid, level, bucket), summary in summaries:
            for column, value in zip(columns, (mid, level, bucket, *summary), strict=True):
                column.append(value)
        raw = driver_connection(db_session)
        with raw.cursor() as cur:
            # Prepared: planning this statement costs more than running it on a batch.
            cur.execute(_UPSERT_POSTGRESQL, (run_id, *columns), prepare=True)
    else:
        db_session.connection().exec_driver_sql(
            _UPSERT_SQLITE,
            [(run_id, mid, level, bucket, *summary) for (mid, level, bucket), summary in summaries],
        )


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
