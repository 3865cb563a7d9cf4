"""Runs created over REST: external runs that any training script logs to, and single queued runs.

An external run (``external=True``) is created directly in ``running`` — the dispatcher claims
only ``queued`` runs, so it never touches one — logged to in batches through the same
ingestion code as the dispatcher's (:func:`services.metrics.write_series`) and finished by
its client. Its config is any JSON object (a script's hyper-parameters), size-capped. A
non-external run is a one-run sweep, validated like any sweep.

Metric posts and the finish race safely: the post locks the run row on PostgreSQL (so the
finishing UPDATE waits for it), and re-reads the status after writing on SQLite (where the
write already holds the database's write lock).
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from typing_extensions import TypedDict

from services.db import array_literal, driver_connection, session_scope
from services.errors import Conflict, FieldError, NotFound, SpecError
from services.manifest import base_manifest
from services.metrics import (
    MAX_STEP,
    NAME_PATTERN,
    Series,
    columns_of,
    move_round,
    queue_payload,
    write_columns,
)
from services.models import FINAL_STATUSES, Run, utcnow
from services.runs import get_run, transition
from services.settings import Settings
from services.sweeps import SweepSpec, create_sweep


class RunCreate(BaseModel):
    """The body of ``POST /api/v1/runs``."""

    model_config = ConfigDict(extra="forbid")

    config: dict[str, Any] = Field(
        description="a RunConfig for a queued run; any JSON object for an external one"
    )
    external: bool = Field(
        False, description="logged to by its own client over REST instead of the cluster"
    )
    name: str = Field("run", min_length=1, max_length=200, description="of a queued run's sweep")


class RunFinish(BaseModel):
    """The body of ``POST /api/v1/runs/{id}/finish``."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["succeeded", "diverged", "failed", "cancelled"]
    error: str | None = Field(None, max_length=10_000)
    summary: dict[str, Any] = Field(default_factory=dict)


_SPECIAL = {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}


def _number(value: Any) -> float:
    """A JSON number or one of the three strings (and never a boolean)."""
    kind = type(value)
    if kind is float:
        return float(value)
    if kind is int:
        return float(value)
    if kind is str and value in _SPECIAL:
        return _SPECIAL[value]
    raise ValueError('a number, "NaN", "Infinity" or "-Infinity"')


# A validator (not a union) so that a bad value is one error, not one per union member.
JsonNumber = Annotated[float, BeforeValidator(_number)]


class PointIn(TypedDict):
    """One metric point; a non-finite value is "NaN", "Infinity" or "-Infinity".

    A TypedDict, not a model: a 1,000-point batch validates in about half a millisecond.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    metric: Annotated[str, Field(max_length=128, description="[A-Za-z0-9_.-/]{1,128}")]
    step: Annotated[int, Field(ge=0, le=MAX_STEP, strict=True)]
    value: JsonNumber


class SeriesIn(BaseModel):
    """One metric's points as two parallel lists: the compact (and fastest) form of a batch."""

    model_config = ConfigDict(extra="forbid")

    metric: Annotated[str, Field(max_length=128, description="[A-Za-z0-9_.-/]{1,128}")]
    steps: list[Annotated[int, Field(ge=0, le=MAX_STEP, strict=True)]] = Field(min_length=1)
    values: list[JsonNumber] = Field(description="as many as steps; the i-th is at steps[i]")


_NAME_REASON = "not a metric name: [A-Za-z0-9_.-/], 1 to 128 characters"


class MetricBatchIn(BaseModel):
    """The body of ``POST /api/v1/runs/{id}/metrics``: many metrics and steps per call.

    Either ``points`` (one object per point) or ``series`` (per metric, a list of steps and one
    of values). Of a point repeated in a batch the first one counts.
    """

    model_config = ConfigDict(extra="forbid")

    points: list[PointIn] | None = Field(None, min_length=1)
    series: list[SeriesIn] | None = Field(None, min_length=1)

    def size(self) -> int:
        """How many points the batch holds."""
        if self.series is not None:
            return sum(len(s.steps) for s in self.series)
        return len(self.points or ())

    def as_series(self) -> Series:
        """metric name -> (steps, values); SpecError naming each malformed field."""
        if (self.points is None) == (self.series is None):
            field, given = ("series", "both") if self.points else ("points", "neither")
            reason = "a batch has points or series (not both)"
            raise SpecError([FieldError(field, f"{given} given", reason)])
        if self.series is not None:
            return self._columns(self.series)
        return self._grouped(self.points or [])

    @staticmethod
    def _columns(series: list[SeriesIn]) -> Series:
        errors = []
        out: dict[str, tuple[list[int], list[float]]] = {}
        for i, part in enumerate(series):
            if not NAME_PATTERN.match(part.metric):
                errors.append(FieldError(f"series[{i}].metric", part.metric, _NAME_REASON))
            if len(part.values) != len(part.steps):
                reason = f"has {len(part.values)} values for {len(part.steps)} steps"
                errors.append(FieldError(f"series[{i}].values", len(part.values), reason))
            if part.metric in out:  # the same metric twice: one series, in order
                out[part.metric][0].extend(part.steps)
                out[part.metric][1].extend(part.values)
            else:
                out[part.metric] = (part.steps, part.values)
        if errors:
            raise SpecError(errors)
        return out

    @staticmethod
    def _grouped(points: list[PointIn]) -> Series:
        out: dict[str, tuple[list[int], list[float]]] = {}
        bad: dict[str, int] = {}
        for i, p in enumerate(points):
            name = p["metric"]
            if name not in out:
                if not NAME_PATTERN.match(name):
                    bad.setdefault(name, i)
                out[name] = ([], [])
            steps, values = out[name]
            steps.append(p["step"])
            values.append(p["value"])
        if bad:
            raise SpecError(
                [FieldError(f"points[{i}].metric", name, _NAME_REASON) for name, i in bad.items()]
            )
        return out


def _json_size(field: str, value: Any, settings: Settings) -> list[FieldError]:
    size = len(json.dumps(_finite(value)).encode())
    if size <= settings.max_config_bytes:
        return []
    return [
        FieldError(
            field,
            f"{size} bytes",
            f"exceeds the cap {settings.max_config_bytes} bytes "
            "(raise it with OVERPARAM_MAX_CONFIG_BYTES)",
        )
    ]


def _finite(value: Any) -> Any:
    """``value`` with non-finite floats as "NaN"/"Infinity"/"-Infinity" (JSONB refuses NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_finite(item) for item in value]
    return value


def create_run(*, db_session: Session, body: RunCreate, settings: Settings) -> Run:
    """An external run (``running`` at once), or a queued one (a sweep of one run)."""
    if not body.external:
        try:
            sweep = create_sweep(
                db_session=db_session,
                spec=SweepSpec(name=body.name, base=body.config),
                settings=settings,
            )
        except SpecError as exc:  # the sweep calls the config "base"
            raise SpecError(
                [
                    FieldError(e.field.replace("base", "config", 1), e.value, e.reason)
                    for e in exc.errors
                ]
            ) from exc
        return db_session.scalars(select(Run).where(Run.sweep_id == sweep.id)).one()
    errors = _json_size("config", body.config, settings)
    if errors:
        raise SpecError(errors)
    now = utcnow()
    config = _finite(body.config)
    run = Run(
        sweep_id=None,
        index=0,
        config=config,
        overrides={},
        status="running",
        attempt=1,
        summary={},
        manifest=base_manifest() | {"config": config},
        cancel_requested=False,
        external=True,
        started_at=now,
        heartbeat_at=now,
    )
    db_session.add(run)
    db_session.flush()
    return run


def _check_writable(run_id: int, found: Any) -> None:
    """``found``: the run's (external, status), or None."""
    if found is None:
        raise NotFound(f"run {run_id} does not exist")
    external, status = found
    if not external:
        raise Conflict(
            f"run {run_id} is trained on the cluster: only the dispatcher writes its metrics"
        )
    if status in FINAL_STATUSES:
        raise Conflict(f"run {run_id} is already {status}: it takes no more metrics")


def _run_state(db_session: Session, run_id: int, lock: bool) -> Any:
    """The run's (external, status) or None, through the driver.

    ``lock``: a row lock on PostgreSQL, so that other batches and a finish wait for this one.
    """
    raw = driver_connection(db_session)
    if db_session.get_bind().dialect.name == "postgresql":
        sql = _LOCK_RUN if lock else "SELECT external, status FROM run WHERE id = %s"
    else:
        sql = "SELECT external, status FROM run WHERE id = ?"
    return raw.execute(sql, (run_id,)).fetchone()


_LOCK_RUN = "SELECT external, status FROM run WHERE id = %s FOR NO KEY UPDATE"
MAX_ID = 2**31 - 1  # run ids are 32-bit integers
_FINAL = "{" + ",".join(sorted(FINAL_STATUSES)) + "}"  # a text[] literal
# Queue the batch unless the run takes no metrics or some point of it may be stored or queued
# already (an index probe of each for the batch's metrics and step range). Never prepared: a
# generic plan made while the tables were small would scan them.
_ENQUEUE_UNLESS_OVERLAP = """
    INSERT INTO metric_batch_queue (run_id, metric_ids, first_step, last_step, points, payload)
    SELECT %(run)s, %(mids)s::int4[], %(first)s, %(last)s, %(points)s, %(payload)s
    WHERE EXISTS (SELECT 1 FROM run WHERE id = %(run)s AND external
                  AND status <> ALL(%(final)s::text[]))
      AND NOT EXISTS (SELECT 1 FROM metric WHERE run_id = %(run)s
                      AND metric_id = ANY(%(mids)s::int4[])
                      AND step BETWEEN %(first)s AND %(last)s)
      AND NOT EXISTS (SELECT 1 FROM metric_batch_queue WHERE run_id = %(run)s
                      AND first_step <= %(last)s AND last_step >= %(first)s
                      AND metric_ids && %(mids)s::int4[])
"""


def log_batch(*, sessions: sessionmaker[Session], run_id: int, series: Series) -> int:
    """Store a batch of an external, running run, committed; how many points were new.

    PostgreSQL: batches of a run take turns (a row lock on the run, which a finish waits for
    too). A batch none of whose points is stored or queued, the usual case, is queued
    (write-behind, ``services/metrics.py``): the lock, the checked insert and the commit go to
    the server in one round trip. A batch that overlaps is written directly, under the run's
    lock, after the run's queue is moved, so that of a point posted twice the first stored
    counts and ``stored`` is exact.
    """
    if not 0 < run_id <= MAX_ID:
        raise NotFound(f"run {run_id} does not exist")
    with session_scope(sessions) as db:
        columns = columns_of(db_session=db, series=series)
        if db.get_bind().dialect.name != "postgresql":
            _check_writable(run_id, _run_state(db, run_id, lock=False))
            stored = write_columns(db_session=db, run_id=run_id, columns=columns)
            # The batch's INSERT took SQLite's write lock: a finish committed before it is
            # visible now, and none can commit until this transaction ends.
            _check_writable(run_id, _run_state(db, run_id, lock=False))
            return stored
        raw = driver_connection(db)
        params = {
            "run": run_id,
            "mids": array_literal(np.unique(columns.metric_ids).tolist()),
            "first": int(columns.steps.min()),
            "last": int(columns.steps.max()),
            "points": len(columns),
            "payload": queue_payload(columns),
            "final": _FINAL,
        }
        # Names this batch created must not outlive a refusal: then the commit waits.
        commit_now = not db.info.get("created_metric_names")
        with raw.pipeline():  # the lock, the checked insert and the commit: one round trip
            lock = raw.execute(_LOCK_RUN, (run_id,), prepare=True)
            queued = raw.execute(_ENQUEUE_UNLESS_OVERLAP, params, prepare=False)
            if commit_now:
                raw.commit()  # nothing is queued for a run that takes no metrics
        _check_writable(run_id, lock.fetchone())
        if queued.rowcount == 1:
            return len(columns)
    # Overlaps what is stored or queued (rare: a re-sent batch). Write it in a transaction of
    # its own that holds the run, after moving the run's queue in that same transaction. A
    # batch queued in between was posted while this one had no answer yet: the two are
    # concurrent, and storing that one first is one of their valid orders (``stored`` counts
    # agree with it).
    with session_scope(sessions) as db:
        _check_writable(run_id, _run_state(db, run_id, lock=True))
        while move_round(db, run_id, wait=True) > 0:
            pass
        return write_columns(db_session=db, run_id=run_id, columns=columns)


def finish_run(*, db_session: Session, run_id: int, body: RunFinish, settings: Settings) -> Run:
    """Set an external run's final state (once); its summary and error are the client's."""
    run = get_run(db_session=db_session, run_id=run_id)
    if not run.external:
        raise Conflict(f"run {run_id} is trained on the cluster: the dispatcher finishes it")
    if run.status in FINAL_STATUSES:
        raise Conflict(f"run {run_id} is already {run.status}")
    errors = _json_size("summary", body.summary, settings)
    if errors:
        raise SpecError(errors)
    finished = transition(
        db_session=db_session,
        run_id=run_id,
        expected="running",
        new=body.status,
        error=body.error,
        summary=_finite(body.summary),
        heartbeat_at=utcnow(),
    )
    if not finished:  # another finish won the race
        db_session.refresh(run)
        raise Conflict(f"run {run_id} is already {run.status}")
    db_session.flush()
    db_session.refresh(run)
    return get_run(db_session=db_session, run_id=run_id)
