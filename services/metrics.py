"""Metric ingestion: one write path for the dispatcher's batches and for REST batches.

:func:`write_series` stores a batch in the caller's transaction: its names are normalized into
``metric_name``, and each metric's points become chunks (``services/chunks.py``) with one
SELECT of the stored chunks the batch reaches and one INSERT (plus one UPDATE when the batch
overlaps stored points or follows a small chunk). Exactly once per (run, metric, step): of a
step stored or repeated, the first value counts. Writers of one run take turns: the REST path
locks the run's row first (``services/external_runs.py``); the dispatcher is the only writer
of the runs it trains.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Engine, Table, bindparam, case, or_, select, update
from sqlalchemy.orm import Session

from services.chunks import SMALL_CHUNK, TAIL_WINDOW, Points, StoredChunk, plan_write
from services.dialects import dialect_of
from services.models import MetricChunk, MetricName
from services.telemetry import points_written

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")
MAX_STEP = 2**63 - 1  # the largest step both backends store as an integer

Point = tuple[str, int, float]
Series = Mapping[str, tuple[Any, Any]]  # metric name -> (steps, values), sequences or arrays

# Committed metric names never change id and are never deleted: cache them per database.
_known_ids: weakref.WeakKeyDictionary[Engine, dict[str, int]] = weakref.WeakKeyDictionary()
_MAX_CACHED = 100_000


def metric_ids(*, db_session: Session, names: Iterable[str]) -> dict[str, int]:
    """Ids of ``names``, creating the missing ones (idempotent under concurrency)."""
    wanted = sorted(set(names))
    engine = db_session.get_bind()
    cache = _known_ids.setdefault(engine, {}) if isinstance(engine, Engine) else {}
    found = {name: cache[name] for name in wanted if name in cache}
    if len(found) == len(wanted):
        return found
    query = select(MetricName.name, MetricName.id)
    rows = db_session.execute(query.where(MetricName.name.in_(set(wanted) - set(found))))
    found |= {name: id_ for name, id_ in rows}
    # Only names this transaction did not create may be cached: it may still roll back.
    if not db_session.info.get("created_metric_names"):
        if len(cache) > _MAX_CACHED:
            cache.clear()
        cache.update(found)
    missing = [name for name in wanted if name not in found]
    if missing:
        db_session.info["created_metric_names"] = True
        insert = dialect_of(db_session).insert(MetricName.__table__)  # type: ignore[arg-type]
        db_session.execute(
            insert.on_conflict_do_nothing(index_elements=["name"]),
            [{"name": name} for name in missing],
        )
        rows = db_session.execute(query.where(MetricName.name.in_(missing)))
        found |= {name: id_ for name, id_ in rows}
    return found


def write_points(*, db_session: Session, run_id: int, points: Sequence[Point]) -> int:
    """:func:`write_series` for (name, step, value) points."""
    grouped: dict[str, tuple[list[int], list[float]]] = {}
    for name, step, value in points:
        steps, values = grouped.setdefault(name, ([], []))
        steps.append(step)
        values.append(value)
    return write_series(db_session=db_session, run_id=run_id, series=grouped)


def write_series(*, db_session: Session, run_id: int, series: Series) -> int:
    """Store ``series`` of ``run_id`` in the caller's transaction; how many points were new.

    The caller has checked that the run exists and may be written to, and holds it.
    """
    ids = metric_ids(db_session=db_session, names=series.keys()) if series else {}
    histories = {ids[name]: Points.of(*pair) for name, pair in series.items()}
    histories = {mid: points for mid, points in histories.items() if len(points)}
    if not histories:
        return 0
    first = min(int(p.steps[0]) for p in histories.values())
    last = max(int(p.steps[-1]) for p in histories.values())
    stored = _stored_chunks(db_session, run_id, sorted(histories), first, last)
    inserts, updates, new = [], [], 0
    for mid, points in sorted(histories.items()):
        plan = plan_write(stored.get(mid, []), points)
        key = {"run_id": run_id, "metric_id": mid}
        inserts += [key | piece.chunk_row() for piece in plan.inserts]
        updates += [
            {"b_run": run_id, "b_metric": mid, "b_last": old} | piece.chunk_row()
            for old, piece in plan.updates
        ]
        new += plan.new
    if updates:  # first: a rewritten chunk's new pieces may take its old key
        db_session.connection().execute(_UPDATE, updates)
    if inserts:
        db_session.connection().execute(_TABLE.insert(), inserts)
    points_written(db_session, new)
    return new


_TABLE: Table = MetricChunk.__table__  # type: ignore[assignment]
_UPDATE = (
    update(_TABLE)
    .where(
        _TABLE.c.run_id == bindparam("b_run"),
        _TABLE.c.metric_id == bindparam("b_metric"),
        _TABLE.c.last_step == bindparam("b_last"),
    )
    .values({c.name: bindparam(c.name) for c in _TABLE.c if c.name not in ("run_id", "metric_id")})
)


_NEEDED = or_(MetricChunk.last_step >= bindparam("first"), MetricChunk.count < SMALL_CHUNK)
# Built once: constructing the statement per batch cost as much as running it.
_STORED = (
    select(
        MetricChunk.metric_id,
        MetricChunk.first_step,
        MetricChunk.last_step,
        MetricChunk.count,
        case((_NEEDED, MetricChunk.step_array)),
        case((_NEEDED, MetricChunk.value_array)),
    )
    .where(
        MetricChunk.run_id == bindparam("run"),
        MetricChunk.metric_id.in_(bindparam("mids", expanding=True)),
        MetricChunk.last_step >= bindparam("first") - TAIL_WINDOW,
        MetricChunk.first_step <= bindparam("last"),
    )
    .order_by(MetricChunk.metric_id, MetricChunk.last_step)
)


def _stored_chunks(
    db_session: Session, run_id: int, mids: list[int], first: int, last: int
) -> dict[int, list[StoredChunk]]:
    """The stored chunks :func:`services.chunks.plan_write` needs, by metric, in step order:
    those reaching into [first - TAIL_WINDOW, last], with their points when they overlap
    [first, last] or are small."""
    params = {"run": run_id, "mids": mids, "first": first, "last": last}
    out: dict[int, list[StoredChunk]] = {}
    for mid, lo, hi, count, steps, values in db_session.connection().execute(_STORED, params):
        points = None if steps is None else Points.decode(steps, values)
        out.setdefault(mid, []).append(StoredChunk(lo, hi, count, points))
    return out
