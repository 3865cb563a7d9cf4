"""Runs created over REST: external runs that any training script logs to, and single queued runs.

An external run (``external=True``) is created directly in ``running`` — the dispatcher claims
only ``queued`` runs, so it never touches one — logged to in batches through the same
ingestion code as the dispatcher's (:func:`services.metrics.write_series`) and finished by
its client. Its config is any JSON object (a script's hyper-parameters), size-capped. A
non-external run is a one-run sweep, validated like any sweep.

Metric posts and the finish race safely: a post locks the run's row before it writes (so the
finishing UPDATE waits for it, or the post sees the run finished).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session
from typing_extensions import TypedDict

from services.dialects import dialect_of
from services.errors import Conflict, FieldError, SpecError
from services.manifest import base_manifest
from services.metrics import MAX_STEP, NAME_PATTERN, Series, write_series
from services.models import FINAL_STATUSES, Run, Sweep, utcnow
from services.numbers import JsonNumber, json_safe
from services.runs import get_run, transition
from services.settings import Settings
from services.storable import StoredJson, StoredText
from services.sweeps import SweepSpec, create_sweep
from services.users import Forbidden

MAX_TAGS = 32
TagKey = Annotated[StoredText, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.:/-]+$")]
TagValue = Annotated[StoredText, Field(max_length=256)]


class RunCreate(BaseModel):
    """The body of ``POST /api/v1/runs``."""

    model_config = ConfigDict(extra="forbid")

    config: StoredJson = Field(
        description="a RunConfig for a queued run; an external run's params: any JSON object"
    )
    external: bool = Field(
        False, description="logged to by its own client over REST instead of the cluster"
    )
    name: StoredText = Field(
        "run",
        min_length=1,
        max_length=200,
        description="the run's name (a queued run's sweep takes it too)",
    )
    tags: dict[TagKey, TagValue] = Field(
        default_factory=dict,
        max_length=MAX_TAGS,
        description=f"string labels: at most {MAX_TAGS}, keys [A-Za-z0-9_.:/-]{{1,64}}, "
        "values up to 256 characters",
    )
    source: StoredJson | None = Field(
        None,
        description="what ran (script, git_commit, python, torch...): stored in the manifest "
        "under client (at most max_config_bytes)",
    )
    experiment: StoredText | None = Field(
        None,
        min_length=1,
        max_length=200,
        description="the experiment an external run joins: a sweep of kind experiment, created "
        "on first use (per owner), listed and analysed like any sweep",
    )


class RunFinish(BaseModel):
    """The body of ``POST /api/v1/runs/{id}/finish``."""

    model_config = ConfigDict(extra="forbid")

    status: Literal["succeeded", "diverged", "failed", "cancelled"] = Field(
        description="the run's final state"
    )
    error: StoredText | None = Field(None, max_length=10_000, description="what went wrong")
    summary: StoredJson = Field(
        default_factory=dict, description="any JSON object (at most max_config_bytes)"
    )


class PointIn(TypedDict):
    """One metric point; a non-finite value is "NaN", "Infinity" or "-Infinity".

    A TypedDict, not a model: a 1,000-point batch validates in about half a millisecond.
    """

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]

    metric: Annotated[str, Field(max_length=128, description="[A-Za-z0-9_.-/]{1,128}")]
    step: Annotated[int, Field(ge=0, le=MAX_STEP, strict=True, description="0 to 2⁶³−1")]
    value: Annotated[JsonNumber, Field(description='a number, "NaN", "Infinity" or "-Infinity"')]


class SeriesIn(BaseModel):
    """One metric's points as two parallel lists: the compact (and fastest) form of a batch."""

    model_config = ConfigDict(extra="forbid")

    metric: Annotated[str, Field(max_length=128, description="[A-Za-z0-9_.-/]{1,128}")]
    steps: list[Annotated[int, Field(ge=0, le=MAX_STEP, strict=True)]] = Field(
        min_length=1, description="the steps of the points"
    )
    values: list[JsonNumber] = Field(description="as many as steps; the i-th is at steps[i]")


EXPERIMENT = text("kind = 'experiment'")
_NAME_REASON = "not a metric name: [A-Za-z0-9_.-/], 1 to 128 characters"


class MetricBatchIn(BaseModel):
    """The body of ``POST /api/v1/runs/{id}/metrics``: many metrics and steps per call.

    Either ``points`` (one object per point) or ``series`` (per metric, a list of steps and one
    of values). Of a point repeated in a batch the first one counts.
    """

    model_config = ConfigDict(extra="forbid")

    points: list[PointIn] | None = Field(None, min_length=1, description="one object a point")
    series: list[SeriesIn] | None = Field(
        None, min_length=1, description="per metric, its steps and values (the compact form)"
    )

    def size(self) -> int:
        """How many points the batch holds."""
        if self.series is not None:
            return sum(len(s.steps) for s in self.series)
        return len(self.points or ())

    def as_series(self, settings: Settings) -> Series:
        """metric name -> (steps, values); SpecError naming each malformed field or cap."""
        if (self.points is None) == (self.series is None):
            field, given = ("series", "both") if self.points else ("points", "neither")
            reason = "a batch has points or series (not both)"
            raise SpecError([FieldError(field, f"{given} given", reason)])
        field = "series" if self.series is not None else "points"
        if self.size() > settings.max_batch_points:
            reason = (
                f"over the cap {settings.max_batch_points} per batch "
                "(split it, or raise OVERPARAM_MAX_BATCH_POINTS)"
            )
            raise SpecError([FieldError(field, f"{self.size()} points", reason)])
        series = self._columns(self.series) if self.series else self._grouped(self.points or [])
        if len(series) > settings.max_batch_metrics:
            reason = (
                f"over the cap {settings.max_batch_metrics} metrics per batch "
                "(raise OVERPARAM_MAX_BATCH_METRICS)"
            )
            raise SpecError([FieldError(field, f"{len(series)} metrics", reason)])
        return series

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
            else:  # copies: the merge above must not change the request's own lists
                out[part.metric] = (list(part.steps), list(part.values))
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
    size = len(json.dumps(json_safe(value)).encode())
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


def create_run(
    *, db_session: Session, body: RunCreate, settings: Settings, owner_id: int | None = None
) -> Run:
    """An external run (``running`` at once), or a queued one (a sweep of one run)."""
    if not body.external:
        if body.experiment is not None:
            reason = "only an external run joins an experiment (a queued run is a sweep)"
            raise SpecError([FieldError("experiment", body.experiment, reason)])
        try:
            sweep = create_sweep(
                db_session=db_session,
                spec=SweepSpec(name=body.name, base=body.config),
                settings=settings,
                owner_id=owner_id,
            )
        except SpecError as exc:  # the sweep calls the config "base"
            raise SpecError(
                [
                    FieldError(e.field.replace("base", "config", 1), e.value, e.reason)
                    for e in exc.errors
                ]
            ) from exc
        run = db_session.scalars(select(Run).where(Run.sweep_id == sweep.id)).one()
        run.name, run.tags = body.name, dict(body.tags)
        if body.source is not None:
            run.manifest = run.manifest | {"client": json_safe(body.source)}
        db_session.flush()
        return run
    errors = _json_size("config", body.config, settings)
    errors += _json_size("source", body.source or {}, settings)
    if errors:
        raise SpecError(errors)
    now = utcnow()
    config = json_safe(body.config)
    sweep_id, index = None, 0
    if body.experiment is not None:
        sweep_id, index = join_experiment(
            db_session=db_session, name=body.experiment, owner_id=owner_id
        )
    client = {} if body.source is None else {"client": json_safe(body.source)}
    run = Run(
        owner_id=owner_id,
        sweep_id=sweep_id,
        index=index,
        name=body.name,
        tags=dict(body.tags),
        config=config,
        overrides=flat_params(config),
        status="running",
        attempt=1,
        summary={},
        manifest=base_manifest() | {"config": config} | client,
        cancel_requested=False,
        external=True,
        started_at=now,
        heartbeat_at=now,
    )
    db_session.add(run)
    db_session.flush()
    return run


def flat_params(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """An external run's scalar params with dotted paths ({"opt": {"lr": 0.1}} -> {"opt.lr":
    0.1}): its overrides, from which a sweep's analysis reads what its runs vary."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat |= flat_params(value, f"{prefix}{key}.")
        elif value is None or isinstance(value, str | int | float | bool):
            flat[f"{prefix}{key}"] = value
    return flat


def join_experiment(*, db_session: Session, name: str, owner_id: int | None) -> tuple[int, int]:
    """(sweep id, the new run's index) of ``owner_id``'s experiment ``name``, created on first
    use. The insert does nothing if a concurrent request created it (the partial unique index
    on owner and name); the run count's UPDATE then locks the row, so indexes are distinct."""
    table = Sweep.__table__
    db_session.execute(
        dialect_of(db_session)
        .insert(table)  # type: ignore[arg-type]
        .values(
            owner_id=owner_id,
            name=name,
            kind="experiment",
            spec={"experiment": name},
            run_count=0,
            priority=0,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(index_elements=["owner_id", "name"], index_where=EXPERIMENT)
    )
    owner = Sweep.owner_id.is_(None) if owner_id is None else Sweep.owner_id == owner_id
    row = db_session.execute(
        update(Sweep)
        .where(Sweep.kind == "experiment", Sweep.name == name, owner)
        .values(run_count=Sweep.run_count + 1)
        .returning(Sweep.id, Sweep.run_count)
        .execution_options(synchronize_session=False)
    ).first()
    assert row is not None
    return row.id, row.run_count - 1


def log_batch(
    *, db_session: Session, run_id: int, series: Series, owner_id: int | None = None
) -> int:
    """Store a batch of an external, running run in the caller's transaction; how many points
    were new.

    The run's row is locked first (an UPDATE of its heartbeat that only matches a running
    external run, of ``owner_id`` if given), so batches of one run take turns and a finish
    waits for them: a batch racing with the finish is stored before it or refused, never after.
    The run's count of stored points grows by the new ones.
    """
    now = utcnow()
    mine = [] if owner_id is None else [Run.owner_id == owner_id]
    locked = db_session.execute(
        update(Run)
        .where(Run.id == run_id, Run.external.is_(True), Run.status == "running", *mine)
        .values(heartbeat_at=now)
        .returning(Run.id)
        .execution_options(synchronize_session=False)
    ).first()
    if locked is None:
        run = get_run(db_session=db_session, run_id=run_id)
        if owner_id is not None and run.owner_id != owner_id:
            raise Forbidden(f"run {run_id} belongs to another user: only its owner may log to it")
        if not run.external:
            raise Conflict(
                f"run {run_id} is trained on the cluster: only the dispatcher writes its metrics"
            )
        raise Conflict(f"run {run_id} is already {run.status}: it takes no more metrics")
    new = write_series(db_session=db_session, run_id=run_id, series=series)
    db_session.execute(
        update(Run)
        .where(Run.id == run_id)
        .values(points=Run.points + new)
        .execution_options(synchronize_session=False)
    )
    return new


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
        summary=json_safe(body.summary),
        heartbeat_at=utcnow(),
    )
    if not finished:  # another finish won the race
        db_session.refresh(run)
        raise Conflict(f"run {run_id} is already {run.status}")
    db_session.flush()
    db_session.refresh(run)
    return get_run(db_session=db_session, run_id=run_id)
