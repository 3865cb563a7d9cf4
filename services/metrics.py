"""Metric ingestion: one statement per batch, idempotent on (run, metric, step).

A batch is :class:`Columns` (metric ids, steps, values as numpy arrays, sorted by key, each key
once), so the COPY payload and the rollup summaries are built without a Python object per
point. A re-sent point is ignored and the first stored value wins, so a retried batch never
doubles anything. On PostgreSQL a batch is one binary ``COPY`` straight into ``metric`` inside
a savepoint (the common case: none of its points is stored yet), falling back to ``INSERT …
SELECT FROM unnest(…) ON CONFLICT DO NOTHING`` when some are; on SQLite it is one
``executemany`` of ``INSERT … ON CONFLICT DO NOTHING``. Either way it runs in the caller's
transaction together with the batch's min/max rollups (``services/rollups.py``: upserted on
SQLite, left pending for the background merger on PostgreSQL). Rows go in key order, so
concurrent writers of overlapping batches wait for each other instead of deadlocking.

Batches posted over REST on PostgreSQL are written behind (see the section below): committed
as one queue row, moved into ``metric`` by :class:`DeferredWriter`, and moved by any read of
their run first.

Names are normalized into ``metric_name`` (ids cached per engine). NaN is stored as NULL
(SQLite cannot hold NaN); ±inf as they are. In JSON, non-finite values are the strings
``"NaN"``, ``"Infinity"`` and ``"-Infinity"`` (:func:`json_number`, :func:`parse_number`).
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
from sqlalchemy import Engine, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.db import driver_connection, side_engine
from services.models import MetricName
from services.rollups import Row, merge_pending, merge_rollups

log = logging.getLogger(__name__)

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


@dataclass(frozen=True)
class Columns:
    """Points of one run as columns, sorted by (metric id, step), each key once.

    NaN is NaN here (NULL once stored). The hot paths (COPY payload, rollups) work on whole
    columns with numpy instead of a Python object per point.
    """

    metric_ids: npt.NDArray[np.int32]
    steps: npt.NDArray[np.int64]
    values: npt.NDArray[np.float64]

    def __len__(self) -> int:
        return len(self.steps)

    @classmethod
    def build(cls, parts: Iterable[tuple[int, Any, Any]]) -> Columns:
        """From (metric id, steps, values) parts; of a repeated key the first point counts."""
        mids, steps, values = [], [], []
        for mid, part_steps, part_values in parts:
            steps.append(np.asarray(part_steps, dtype=np.int64))
            values.append(np.asarray(part_values, dtype=np.float64))
            mids.append(np.full(len(steps[-1]), mid, dtype=np.int32))
        if not steps:
            return cls.empty()
        all_mids, all_steps = np.concatenate(mids), np.concatenate(steps)
        order = np.lexsort((all_steps, all_mids))  # stable: repeated keys keep their order
        columns = cls(all_mids[order], all_steps[order], np.concatenate(values)[order])
        m, s = columns.metric_ids, columns.steps
        first = np.ones(len(s), dtype=bool)
        first[1:] = (m[1:] != m[:-1]) | (s[1:] != s[:-1])
        return columns if first.all() else columns.where(first)

    @classmethod
    def concat(cls, parts: Sequence[Columns]) -> Columns:
        """One batch of several, in order: of a key in more than one, the first counts."""
        return cls.build(
            (int(mid), part.steps[part.metric_ids == mid], part.values[part.metric_ids == mid])
            for part in parts
            for mid in np.unique(part.metric_ids)
        )

    @classmethod
    def from_rows(cls, rows: Sequence[Row]) -> Columns:
        """From (metric id, step, stored value) rows sorted by key (None is NaN)."""
        if not rows:
            return cls.empty()
        mids, steps, values = zip(*rows, strict=True)
        return cls(
            np.array(mids, dtype=np.int32),
            np.array(steps, dtype=np.int64),
            np.array([math.nan if v is None else v for v in values], dtype=np.float64),
        )

    @classmethod
    def empty(cls) -> Columns:
        return cls(np.empty(0, np.int32), np.empty(0, np.int64), np.empty(0, np.float64))

    def rows(self) -> list[Row]:
        """(metric id, step, stored value) tuples: NaN as None."""
        values = [None if v != v else v for v in self.values.tolist()]
        return list(zip(self.metric_ids.tolist(), self.steps.tolist(), values, strict=True))

    def where(self, keep: npt.NDArray[np.bool_]) -> Columns:
        return Columns(self.metric_ids[keep], self.steps[keep], self.values[keep])


Series = Mapping[str, tuple[Any, Any]]  # metric name -> (steps, values), as sequences or arrays


def write_points(*, db_session: Session, run_id: int, points: Sequence[Point]) -> int:
    """Store ``points`` of ``run_id`` in the caller's transaction; returns how many were new.

    Points already stored (or repeated within ``points``: the first one counts) are ignored.
    The caller has checked that the run exists and may be written to.
    """
    grouped: dict[str, tuple[list[int], list[float]]] = {}
    for name, step, value in points:
        if name not in grouped:
            grouped[name] = ([], [])
        steps, values = grouped[name]
        steps.append(step)
        values.append(value)
    return write_series(db_session=db_session, run_id=run_id, series=grouped)


def write_series(*, db_session: Session, run_id: int, series: Series) -> int:
    """:func:`write_points` for points given as columns per metric name."""
    return write_columns(
        db_session=db_session,
        run_id=run_id,
        columns=columns_of(db_session=db_session, series=series),
    )


def columns_of(*, db_session: Session, series: Series) -> Columns:
    """``series`` as columns of metric ids (names created as needed)."""
    if not series:
        return Columns.empty()
    ids = metric_ids(db_session=db_session, names=series.keys())
    return Columns.build((ids[name], *pair) for name, pair in series.items())


def write_columns(
    *, db_session: Session, run_id: int, columns: Columns, defer_rollups: bool = True
) -> int:
    """Store ``columns`` in the caller's transaction; returns how many points were new.

    ``defer_rollups``: leave the rollups pending on PostgreSQL (see :func:`merge_rollups`).
    """
    if not len(columns):
        return 0
    if db_session.get_bind().dialect.name == "postgresql":
        new, merge = _insert_postgresql(db_session, run_id, columns)
    else:
        new, merge = _insert_sqlite(db_session, run_id, columns)
    merge_rollups(db_session=db_session, run_id=run_id, columns=merge, defer=defer_rollups)
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


def copy_payload(run_id: int, columns: Columns) -> bytes:
    """The points in PostgreSQL's binary COPY format, built by numpy.

    A NULL (NaN) value is its length -1 with no bytes after it: those rows lose their last
    8 bytes.
    """
    table = np.empty(len(columns), _COPY_ROW)
    table["fields"] = 4
    table["run_len"], table["metric_len"], table["step_len"], table["value_len"] = 4, 4, 8, 8
    table["run_id"] = run_id
    table["metric_id"], table["step"], table["value"] = (
        columns.metric_ids,
        columns.steps,
        columns.values,
    )
    null = np.isnan(columns.values)
    if not null.any():
        return _COPY_HEADER + table.tobytes() + _COPY_TRAILER
    table["value_len"][null] = -1
    keep = np.ones((len(table), _COPY_ROW.itemsize), dtype=bool)
    keep[null, -8:] = False
    body = table.view(np.uint8).reshape(len(table), _COPY_ROW.itemsize)[keep]
    return _COPY_HEADER + body.tobytes() + _COPY_TRAILER


def _insert_postgresql(db_session: Session, run_id: int, columns: Columns) -> tuple[int, Columns]:
    """(points stored, the points to merge into the rollups: exactly the new ones)."""
    import psycopg

    raw = driver_connection(db_session)
    with raw.cursor() as cur:
        # The savepoint (raw: the session need not know) keeps the transaction usable when
        # COPY meets a stored key.
        cur.execute("SAVEPOINT metric_copy")
        try:
            copy_sql = "COPY metric (run_id, metric_id, step, value) FROM STDIN (FORMAT BINARY)"
            with cur.copy(copy_sql) as copy:
                copy.write(copy_payload(run_id, columns))
        except psycopg.errors.UniqueViolation:
            cur.execute("ROLLBACK TO SAVEPOINT metric_copy")
        else:
            cur.execute("RELEASE SAVEPOINT metric_copy")
            return len(columns), columns
        values = [None if v != v else v for v in columns.values.tolist()]
        cur.execute(
            "INSERT INTO metric (run_id, metric_id, step, value) "
            "SELECT %s, m, s, v FROM unnest(%s::int4[], %s::int8[], %s::float8[]) AS t(m, s, v) "
            "ORDER BY m, s ON CONFLICT DO NOTHING RETURNING metric_id, step, value",
            (run_id, columns.metric_ids.tolist(), columns.steps.tolist(), values),
        )
        new = Columns.from_rows(sorted(cur.fetchall()))
        return len(new), new


def _insert_sqlite(db_session: Session, run_id: int, columns: Columns) -> tuple[int, Columns]:
    """(points stored, the points to merge into the rollups: the new ones and harmless repeats)."""
    conn = db_session.connection()
    rows = columns.rows()
    result = conn.exec_driver_sql(
        "INSERT INTO metric (run_id, metric_id, step, value) VALUES (?, ?, ?, ?) "
        "ON CONFLICT DO NOTHING",
        [(run_id, *row) for row in rows],
    )
    if result.rowcount == len(rows):
        return len(rows), columns
    # Some were stored already. This transaction holds SQLite's write lock now, so reading back
    # is exact: a point whose stored value is the one sent is either new or a harmless repeat
    # (merging it into the min/max rollups again changes nothing); one stored with another
    # value was ignored.
    stored: dict[tuple[int, int], float | None] = {}
    for mid in np.unique(columns.metric_ids).tolist():
        steps = columns.steps[columns.metric_ids == mid]
        found = conn.exec_driver_sql(
            "SELECT step, value FROM metric WHERE run_id = ? AND metric_id = ? "
            "AND step BETWEEN ? AND ?",
            (run_id, mid, int(steps.min()), int(steps.max())),
        )
        stored |= {(mid, step): value for step, value in found}
    keep = np.array([stored.get(row[:2], ()) == row[2] for row in rows], dtype=bool)
    return result.rowcount, columns.where(keep)


# -- write-behind: REST batches on PostgreSQL ---------------------------------------------------
#
# A batch posted over REST is validated, checked against what is stored (and queued) for its
# run, and committed as one ``metric_batch_queue`` row: one small insert instead of a COPY of
# every point, so the client's request ends sooner and the COPY runs on another core. The
# :class:`DeferredWriter` of the process moves queued batches into ``metric`` (oldest first,
# one run at a time under the run's advisory lock, so a run's points land in the order they
# were posted), and every read of a run first moves what is queued of it
# (:func:`settle_points`), so a read never misses a point whose post was answered.

_QUEUE_LOCK = 0x6F707131  # advisory lock class of "moving run X's queued batches"


def queue_payload(columns: Columns) -> bytes:
    """The bytes of a ``metric_batch_queue`` row: metric ids, steps, values (native order)."""
    return columns.metric_ids.tobytes() + columns.steps.tobytes() + columns.values.tobytes()


def _queued(points: int, payload: bytes) -> Columns:
    ends = (4 * points, 12 * points)
    return Columns(
        np.frombuffer(payload, np.int32, points),
        np.frombuffer(payload, np.int64, points, ends[0]),
        np.frombuffer(payload, np.float64, points, ends[1]),
    )


def move_queued(engine: Engine, run_id: int, batches: int = 20) -> int:
    """Move ``run_id``'s queued batches into ``metric``, waiting for any other mover of the run;
    how many batches. No-op on SQLite.

    Each transaction moves up to ``batches`` batches as one COPY (the first of a point posted
    twice counts, as if written in turn) and deletes them.
    """
    if engine.dialect.name != "postgresql":
        return 0
    with Session(side_engine(engine)) as db:
        return _move_runs(db, [run_id], wait=True, batches=batches)


_CLAIM = """
    WITH turn AS ({lock})
    SELECT id, points, payload FROM metric_batch_queue, turn
    WHERE turn.mine AND run_id = %(run)s ORDER BY id LIMIT %(batches)s
"""
# Waiting for any other mover of the run (the function returns void), or skipping the run.
_CLAIM_WAITING = _CLAIM.format(
    lock="SELECT true AS mine FROM (SELECT pg_advisory_xact_lock(%(class)s, %(run)s)) AS held"
)
_CLAIM_SKIPPING = _CLAIM.format(lock="SELECT pg_try_advisory_xact_lock(%(class)s, %(run)s) AS mine")


def _move_runs(db: Session, runs: Sequence[int], wait: bool, batches: int) -> int:
    """Move the queues of ``runs`` in ``db``, a transaction per round of each run."""
    moved = 0
    for run in runs:
        while True:
            count = move_round(db, run, wait=wait, batches=batches)
            db.commit()
            moved += count
            if count < batches:  # fewer: the queue is empty, or another mover has the run
                break
    return moved


def move_round(db: Session, run_id: int, wait: bool = True, batches: int = 20) -> int:
    """Move up to ``batches`` of ``run_id``'s queued batches in ``db``'s transaction, which
    then holds the run's mover lock until it ends; how many. The caller commits."""
    # The session hands its connection back at each commit: take it anew.
    raw = driver_connection(db)
    params = {"class": _QUEUE_LOCK, "run": run_id, "batches": batches}
    rows = raw.execute(_CLAIM_WAITING if wait else _CLAIM_SKIPPING, params).fetchall()
    if rows:
        parts = [_queued(points, payload) for _, points, payload in rows]
        columns = Columns.concat(parts)  # off the request path: rollups merged at once
        write_columns(db_session=db, run_id=run_id, columns=columns, defer_rollups=False)
        ids = [id_ for id_, _, _ in rows]
        raw.execute("DELETE FROM metric_batch_queue WHERE id = ANY(%s)", (ids,))
    return len(rows)


def settle_points(db_session: Session, run_id: int) -> None:
    """Move what is queued of ``run_id`` before it is read (PostgreSQL).

    The queue is read once per session (it is small: batches live there for milliseconds),
    so a read of a sweep's many runs costs one query, not one per run.
    """
    engine = db_session.get_bind()
    if not isinstance(engine, Engine) or engine.dialect.name != "postgresql":
        return
    if "queued_runs" not in db_session.info:
        sql = "SELECT DISTINCT run_id FROM metric_batch_queue"
        db_session.info["queued_runs"] = {r for (r,) in driver_connection(db_session).execute(sql)}
    queued: set[int] = db_session.info["queued_runs"]
    if run_id in queued:
        move_queued(engine, run_id)  # on the side pool: see services.db.side_engine
        queued.discard(run_id)


_WORK = (
    "SELECT ARRAY(SELECT DISTINCT run_id FROM metric_batch_queue),"
    " EXISTS (SELECT 1 FROM metric_rollup_pending)"
)


class DeferredWriter:
    """Moves queued batches and merges pending rollups in a daemon thread (PostgreSQL): when
    :meth:`notify`-ed after a commit, and every ``interval`` seconds whatever is left (say,
    of a process that died before doing it). Errors are logged and retried; they never reach
    the writers, whose points are committed already."""

    def __init__(self, engine: Engine, interval: float = 5.0) -> None:
        self.engine = engine
        self.interval = interval
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> DeferredWriter:
        if self.engine.dialect.name == "postgresql" and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="deferred-writer", daemon=True)
            self._thread.start()
        return self

    def notify(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _loop(self) -> None:
        while not self._stopping:
            self._wake.wait(self.interval)
            self._wake.clear()
            try:
                with Session(side_engine(self.engine)) as db:
                    runs, pending = driver_connection(db).execute(_WORK).fetchone()
                    db.commit()
                    _move_runs(db, runs, wait=False, batches=20)
                if pending:
                    merge_pending(self.engine)
            except Exception:  # the next wake-up retries; writers are never affected
                log.exception("moving queued metric batches or merging rollups failed")
                time.sleep(1.0)


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
