"""Metric ingestion: one statement per batch, idempotent on (run, metric, step).

A re-sent point is ignored and the first stored value wins, so a retried batch never doubles
anything. On PostgreSQL a batch is one binary ``COPY`` straight into ``metric`` inside a
savepoint (the common case: none of its points is stored yet), falling back to ``INSERT …
SELECT FROM unnest(…) ON CONFLICT DO NOTHING`` when some are; on SQLite it is one
``executemany`` of ``INSERT … ON CONFLICT DO NOTHING``. Either way it runs in the caller's
transaction together with the merge of the new points into the min/max rollups
(``services/rollups.py``). Rows go in key order, so concurrent writers of overlapping batches
wait for each other instead of deadlocking.

Names are normalized into ``metric_name`` (ids cached per engine). NaN is stored as NULL
(SQLite cannot hold NaN); ±inf as they are. In JSON, non-finite values are the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (:func:`json_number`, :func:`parse_number`).
"""

from __future__ import annotations

import math
import re
import struct
import weakref
from collections.abc import Iterable, Sequence

import numpy as np
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.db import driver_connection
from services.models import MetricName
from services.rollups import Row, merge_rollups

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_.\-/]{1,128}$")
MAX_STEP = 2**63 - 1  # the largest step both backends store as an integer

Point = tuple[str, int, float]

# Committed metric names never change id and are never deleted: cache them per database.
_known_ids: weakref.WeakKeyDictionary[Engine, dict[str, int]] = weakref.WeakKeyDictionary()
_MAX_CACHED = 100_000


def metric_ids(*, db_session: Session, names: Iterable[str]) -> dict[str, int]:
    """Ids of ``names``, creating the missing ones (idempotent under concurrency)."""
    wanted = sorted(set(names))
    if not wanted:
        return {}
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
        insert = (
            postgresql.insert(MetricName)
            if engine.dialect.name == "postgresql"
            else sqlite.insert(MetricName)
        )
        db_session.execute(
            insert.on_conflict_do_nothing(index_elements=["name"]),
            [{"name": name} for name in missing],
        )
        rows = db_session.execute(query.where(MetricName.name.in_(missing)))
        found |= {name: id_ for name, id_ in rows}
    return found


def to_db_value(value: float) -> float | None:
    return None if math.isnan(value) else value


def from_db_value(value: float | None) -> float:
    return math.nan if value is None else value


def write_points(*, db_session: Session, run_id: int, points: Sequence[Point]) -> int:
    """Store ``points`` of ``run_id`` in the caller's transaction; returns how many were new.

    Points already stored (or repeated within ``points``: the first one counts) are ignored.
    The caller has checked that the run exists and may be written to.
    """
    if not points:
        return 0
    ids = metric_ids(db_session=db_session, names={name for name, _, _ in points})
    # Reversed, so that the first of repeated keys wins; v != v is NaN, stored as NULL.
    batch = {(ids[name], step): value for name, step, value in reversed(points)}
    rows = sorted([(mid, step, None if v != v else v) for (mid, step), v in batch.items()])
    if db_session.get_bind().dialect.name == "postgresql":
        new, merge = _insert_postgresql(db_session, run_id, rows)
    else:
        new, merge = _insert_sqlite(db_session, run_id, rows)
    merge_rollups(db_session=db_session, run_id=run_id, rows=merge)
    return new


_COPY_HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)
_COPY_TRAILER = b"\xff\xff"
_COPY_ROW = np.dtype(
    [
        ("fields", ">i2"),
        ("run_len", ">i4"),
        ("run_id", ">i4"),
        ("metric_len", ">i4"),
        ("metric_id", ">i4"),
        ("step_len", ">i4"),
        ("step", ">i8"),
        ("value_len", ">i4"),
        ("value", ">f8"),
    ]
)
_COPY_NULL_ROW = struct.Struct(">hiiiiiqi")


def copy_payload(run_id: int, rows: Sequence[Row]) -> bytes:
    """``rows`` in PostgreSQL's binary COPY format (numpy builds it when no value is NULL)."""
    if any(value is None for _, _, value in rows):
        parts = [_COPY_HEADER]
        for mid, step, value in rows:
            if value is None:
                parts.append(_COPY_NULL_ROW.pack(4, 4, run_id, 4, mid, 8, step, -1))
            else:
                parts.append(struct.pack(">hiiiiiqid", 4, 4, run_id, 4, mid, 8, step, 8, value))
        parts.append(_COPY_TRAILER)
        return b"".join(parts)
    table = np.empty(len(rows), _COPY_ROW)
    table["fields"] = 4
    table["run_len"], table["metric_len"], table["step_len"], table["value_len"] = 4, 4, 8, 8
    table["run_id"] = run_id
    mids, steps, values = zip(*rows, strict=True)
    table["metric_id"], table["step"], table["value"] = mids, steps, values
    return _COPY_HEADER + table.tobytes() + _COPY_TRAILER


def _insert_postgresql(
    db_session: Session, run_id: int, rows: list[Row]
) -> tuple[int, Sequence[Row]]:
    """(points stored, the rows to merge into the rollups: exactly the new ones)."""
    import psycopg

    raw = driver_connection(db_session)
    with raw.cursor() as cur:
        # The savepoint (raw: the session need not know) keeps the transaction usable when
        # COPY meets a stored key.
        cur.execute("SAVEPOINT metric_copy")
        try:
            copy_sql = "COPY metric (run_id, metric_id, step, value) FROM STDIN (FORMAT BINARY)"
            with cur.copy(copy_sql) as copy:
                copy.write(copy_payload(run_id, rows))
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT metric_copy")
        else:
            cur.execute("RELEASE SAVEPOINT metric_copy")
            return len(rows), rows
        mids, steps, values = (list(column) for column in zip(*rows, strict=True))
        cur.execute(
            "INSERT INTO metric (run_id, metric_id, step, value) "
            "SELECT %s, m, s, v FROM unnest(%s::int4[], %s::int8[], %s::float8[]) AS t(m, s, v) "
            "ORDER BY m, s ON CONFLICT DO NOTHING RETURNING metric_id, step, value",
            (run_id, mids, steps, values),
        )
        new = sorted(cur.fetchall())
        return len(new), new


def _insert_sqlite(db_session: Session, run_id: int, rows: list[Row]) -> tuple[int, Sequence[Row]]:
    """(points stored, the rows to merge into the rollups: the new ones and harmless repeats)."""
    conn = db_session.connection()
    result = conn.exec_driver_sql(
        "INSERT INTO metric (run_id, metric_id, step, value) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        [(run_id, mid, step, value) for mid, step, value in rows],
    )
    if result.rowcount == len(rows):
        return len(rows), rows
    # Some were stored already. This transaction holds SQLite's write lock now, so reading back
    # is exact: a point whose stored value is the one sent is either new or a harmless repeat
    # (merging it into the min/max rollups again changes nothing); one stored with another
    # value was ignored.
    stored: dict[tuple[int, int], float | None] = {}
    for mid in sorted({mid for mid, _, _ in rows}):
        steps = [step for m, step, _ in rows if m == mid]
        found = conn.exec_driver_sql(
            "SELECT step, value FROM metric WHERE run_id = ? AND metric_id = ? "
            "AND step BETWEEN ? AND ?",
            (run_id, mid, min(steps), max(steps)),
        )
        stored |= {(mid, step): value for step, value in found}
    return result.rowcount, [row for row in rows if stored.get(row[:2], ()) == row[2]]


def json_number(value: float | None) -> float | str | None:
    """A float as JSON allows it: non-finite values become "NaN", "Infinity", "-Infinity"."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "NaN"
    return "Infinity" if value > 0 else "-Infinity"


def parse_number(value: float | int | str) -> float:
    """The inverse of :func:`json_number` (numbers pass; the three strings become floats)."""
    if isinstance(value, str):
        try:
            return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}[value]
        except KeyError:
            raise ValueError('a number, "NaN", "Infinity" or "-Infinity"') from None
    return float(value)
