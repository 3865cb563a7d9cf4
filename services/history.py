"""Metric history queries: names, keyset pages, downsampled series, sweeps, exports.

Every read is a range scan of the (run_id, metric_id, step) primary key (or of the rollups'
key), one metric at a time: a page never sorts a run's whole history, and keyset cursors over
(metric name, step) — or (run, metric name, step) across a sweep — never skip or repeat a
point, however many points are written meanwhile.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from services.db import session_scope
from services.errors import NotFound
from services.metrics import settle_points
from services.models import Metric, MetricName, Run
from services.rollups import Point, downsample, series


@dataclass(frozen=True)
class Series:
    """Points of one metric of one run, in step order (values as stored: None is NaN)."""

    run_id: int
    metric: str
    points: list[Point]


def run_metric_ids(*, db_session: Session, run_id: int) -> dict[str, int]:
    """name -> id of the metrics ``run_id`` has points of (one index probe per metric).

    Every read of a run's points starts here, so this is where batches still queued for the
    run are moved into ``metric`` first (write-behind on PostgreSQL; see services/metrics.py).
    """
    settle_points(db_session, run_id)
    # A loose index scan over the (run_id, metric_id, step) key, written as a recursive CTE
    # because neither dialect skips through an index by itself.
    ids = (
        select(func.min(Metric.metric_id).label("metric_id"))
        .where(Metric.run_id == run_id)
        .cte("ids", recursive=True)
    )
    following = (
        select(func.min(Metric.metric_id))
        .where(Metric.run_id == run_id, Metric.metric_id > ids.c.metric_id)
        .scalar_subquery()
    )
    ids = ids.union_all(select(following).where(ids.c.metric_id.is_not(None)))
    rows = db_session.execute(
        select(MetricName.name, MetricName.id).join(ids, ids.c.metric_id == MetricName.id)
    )
    return {name: id_ for name, id_ in rows}


def run_metric_names(*, db_session: Session, run_id: int) -> list[str]:
    return sorted(run_metric_ids(db_session=db_session, run_id=run_id))


def resolve_names(
    *, db_session: Session, run_id: int, names: Sequence[str] | None
) -> dict[str, int]:
    """name -> id of ``names`` (every metric of the run if None or empty), sorted by name.

    Raises NotFound naming each requested metric the run has no point of.
    """
    known = run_metric_ids(db_session=db_session, run_id=run_id)
    if not names:
        return dict(sorted(known.items()))
    unknown = sorted(set(names) - set(known))
    if unknown:
        has = ", ".join(sorted(known)) or "none yet"
        raise NotFound(
            f"run {run_id} has no metric named {', '.join(map(repr, unknown))} (it has: {has})"
        )
    return {name: known[name] for name in sorted(set(names))}


def read_page(
    *,
    db_session: Session,
    run_id: int,
    names: Sequence[str] | None,
    start: int | None,
    end: int | None,
    after: tuple[str, int] | None,
    limit: int,
) -> list[Series]:
    """Up to ``limit`` points ordered by (metric name, step), strictly after ``after``."""
    out: list[Series] = []
    left = limit
    for name, metric_id in resolve_names(db_session=db_session, run_id=run_id, names=names).items():
        first = start
        if after is not None:
            if name < after[0]:
                continue
            if name == after[0]:
                first = after[1] + 1 if start is None else max(after[1] + 1, start)
        points = series(db_session, run_id, metric_id, first, end, left)
        if points:
            out.append(Series(run_id, name, points))
            left -= len(points)
        if left <= 0:
            break
    return out


def read_downsampled(
    *,
    db_session: Session,
    run_id: int,
    names: Sequence[str] | None,
    start: int | None,
    end: int | None,
    max_points: int,
) -> list[Series]:
    """Each metric reduced to at most ``max_points`` points (see ``rollups.downsample``)."""
    return [
        Series(
            run_id,
            name,
            downsample(
                db_session=db_session,
                run_id=run_id,
                metric_id=metric_id,
                start=start,
                end=end,
                max_points=max_points,
            ),
        )
        for name, metric_id in resolve_names(
            db_session=db_session, run_id=run_id, names=names
        ).items()
    ]


def sweep_run_ids(*, db_session: Session, sweep_id: int) -> list[int]:
    return list(db_session.scalars(select(Run.id).where(Run.sweep_id == sweep_id).order_by(Run.id)))


def read_sweep_page(
    *,
    db_session: Session,
    run_ids: Sequence[int],
    names: Sequence[str] | None,
    start: int | None,
    end: int | None,
    after: tuple[int, str, int] | None,
    limit: int,
    max_points: int | None,
) -> tuple[list[Series], bool]:
    """Points of the runs ordered by (run, metric, step) strictly after ``after``; more left?

    Metrics a run does not have are skipped (a sweep's runs may record different ones). With
    ``max_points`` every series is downsampled and a page holds whole series only.
    """
    out: list[Series] = []
    left = limit
    for run_id in run_ids:
        if after is not None and run_id < after[0]:
            continue
        known = run_metric_ids(db_session=db_session, run_id=run_id)
        for name in sorted(set(names) & set(known) if names else known):
            first = start
            if after is not None and run_id == after[0]:
                if name < after[1] or (name == after[1] and max_points is not None):
                    continue
                if name == after[1]:
                    first = after[2] + 1 if start is None else max(after[2] + 1, start)
            if max_points is not None:
                points = downsample(
                    db_session=db_session,
                    run_id=run_id,
                    metric_id=known[name],
                    start=start,
                    end=end,
                    max_points=max_points,
                )
                if len(points) > left and out:  # the caller keeps max_points ≤ limit
                    return out, True
            else:
                points = series(db_session, run_id, known[name], first, end, left + 1)
                if len(points) > left:
                    if left:
                        out.append(Series(run_id, name, points[:left]))
                    return out, True
            if points:
                out.append(Series(run_id, name, points))
                left -= len(points)
    return out, False


def export_series(
    *,
    sessions: sessionmaker[Session],
    run_ids: Sequence[int],
    names: Sequence[str] | None,
    start: int | None,
    end: int | None,
    page_size: int = 50_000,
) -> Iterator[Series]:
    """Every point of the runs in (run, metric, step) order, in chunks of ``page_size``.

    Each chunk is read in its own short session, so a slow download holds no connection.
    """
    for run_id in run_ids:
        with session_scope(sessions) as db:
            known = run_metric_ids(db_session=db, run_id=run_id)
        for name in sorted(set(names) & set(known) if names else known):
            first = start
            while True:
                with session_scope(sessions) as db:
                    points = series(db, run_id, known[name], first, end, page_size)
                if points:
                    yield Series(run_id, name, points)
                if len(points) < page_size:
                    break
                first = points[-1][0] + 1
