"""Metric histories: log a batch, read pages or downsampled series, bulk-read a sweep, export.

Non-finite values are the JSON strings "NaN", "Infinity" and "-Infinity", in and out. Pages are
encoded from the chunks' arrays directly (a 100k-point page would spend most of its time in a
generic serializer); the response models document the shapes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Iterator, Sequence
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError, WithJsonSchema
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from api.auth import CurrentUser, limited
from api.deps import RunId, SessionDep, SettingsDep, SweepId
from api.problems import problem, problem_responses
from api.schemas import MetricNames, MetricsPage
from services import history
from services import runs as run_service
from services.errors import FieldError, SpecError
from services.exports import ParquetUnavailable, csv_chunks, parquet_file
from services.external_runs import MetricBatchIn, log_batch
from services.metrics import MAX_STEP, NAME_PATTERN
from services.numbers import point_objects
from services.settings import Settings
from services.users import Caller

router = APIRouter(tags=["metrics"])

Names = Annotated[
    list[str] | None,
    Query(max_length=1000, description="metric names (repeatable); default: every metric"),
    # As sent: absent or repeated names (check_query refuses one off the pattern, naming it).
    WithJsonSchema(
        {
            "type": "array",
            "items": {"type": "string", "pattern": NAME_PATTERN.pattern},
            "maxItems": 1000,
        }
    ),
]
Start = Annotated[int | None, Query(ge=0, le=MAX_STEP, description="first step, inclusive")]
End = Annotated[int | None, Query(ge=0, le=MAX_STEP, description="last step, inclusive")]
Cursor = Annotated[
    str | None, Query(max_length=200, description="next_cursor of the previous page")
]
Limit = Annotated[int, Query(ge=1, le=100_000, description="points per page")]
MaxPoints = Annotated[
    int | None,
    Query(
        ge=4,
        le=100_000,
        description="downsample each series to at most this many points (per bucket its "
        "first, last, lowest and highest point); a run's read comes in one page",
    ),
]
ExportFormat = Literal["csv", "parquet"]


class SweepMetricPoint(BaseModel):
    run_id: int
    metric: str
    step: int
    value: float | Literal["NaN", "Infinity", "-Infinity"]


class SweepMetricsPage(BaseModel):
    data: list[SweepMetricPoint]
    count: int
    next_cursor: str | None


class BatchStored(BaseModel):
    received: int
    stored: int


def encode_cursor(cursor: history.Cursor | None) -> str | None:
    return (
        None if cursor is None else base64.urlsafe_b64encode(json.dumps(cursor).encode()).decode()
    )


def _bad_cursor(cursor: str) -> SpecError:
    return SpecError([FieldError("cursor", cursor, "not a cursor this API returned")])


def decode_cursor(cursor: str | None, run_ids: Sequence[int]) -> history.Cursor | None:
    """The position a ``next_cursor`` of a read of ``run_ids`` encodes; SpecError for any
    other string (a cursor of another run's read included)."""
    if cursor is None:
        return None
    try:
        run_id, metric_id, step = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if not all(type(part) is int for part in (run_id, metric_id, step)):
            raise ValueError
        if not (0 < run_id < 2**31 and 0 < metric_id < 2**31 and 0 <= step <= MAX_STEP):
            raise ValueError
    except (ValueError, TypeError, RecursionError, binascii.Error) as exc:
        raise _bad_cursor(cursor) from exc
    if run_id not in run_ids:
        raise _bad_cursor(cursor)
    return run_id, metric_id, step


def check_query(names: Sequence[str] | None, start: int | None, end: int | None) -> None:
    errors = [
        FieldError(f"name[{i}]", name, f"not a metric name ({NAME_PATTERN.pattern})")
        for i, name in enumerate(names or [])
        if not NAME_PATTERN.match(name)
    ]
    if start is not None and end is not None and end < start:
        errors.append(FieldError("end", end, f"must be ≥ start ({start})"))
    if errors:
        raise SpecError(errors)


def page_response(
    series: Sequence[history.Series], next_cursor: history.Cursor | None, with_run: bool
) -> Response:
    data = ",".join(
        point_objects(s.run_id if with_run else None, s.metric, s.points) for s in series
    )
    count = sum(len(s.points) for s in series)
    cursor = json.dumps(encode_cursor(next_cursor))
    body = f'{{"data":[{data}],"count":{count},"next_cursor":{cursor}}}'
    return Response(body, media_type="application/json")


def export_response(
    request: Request,
    run_ids: list[int],
    metric_ids: list[int] | None,
    start: int | None,
    end: int | None,
    format: ExportFormat,
    filename: str,
) -> Response:
    selection = history.Selection(run_ids, metric_ids, start, end)
    series = history.iter_series(sessions=request.app.state.sessions, selection=selection)
    if format == "csv":
        headers = {"Content-Disposition": f'attachment; filename="{filename}.csv"'}
        return StreamingResponse(csv_chunks(series), media_type="text/csv", headers=headers)
    try:
        file = parquet_file(series)
    except ParquetUnavailable as exc:
        return problem(501, "Not implemented", str(exc))

    def read() -> Iterator[bytes]:
        with file:
            while block := file.read(1 << 20):
                yield block

    headers = {"Content-Disposition": f'attachment; filename="{filename}.parquet"'}
    return StreamingResponse(read(), media_type="application/vnd.apache.parquet", headers=headers)


def _page(
    db: SessionDep,
    run_ids: list[int],
    what: str,
    name: list[str] | None,
    start: int | None,
    end: int | None,
    cursor: str | None,
    limit: int,
    max_points: int | None,
    with_run: bool,
) -> Response:
    """A page of the runs' points, or (``max_points``) their downsampled series."""
    check_query(name, start, end)
    metric_ids = history.resolve(db_session=db, run_ids=run_ids, names=name, what=what)
    selection = history.Selection(run_ids, metric_ids, start, end)
    after = decode_cursor(cursor, run_ids)
    if max_points is None:
        page = history.read_page(db_session=db, selection=selection, after=after, limit=limit)
    elif max_points > limit:
        raise SpecError([FieldError("max_points", max_points, f"must be ≤ limit ({limit})")])
    else:
        page = history.read_downsampled(
            db_session=db, selection=selection, max_points=max_points, after=after, limit=limit
        )
    return page_response(*page, with_run)


@router.get("/runs/{run_id}/metric-names", response_model=MetricNames)
def metric_names(run_id: RunId, db: SessionDep) -> MetricNames:
    """The names of the metrics this run has recorded."""
    run_service.get_run(db_session=db, run_id=run_id)
    names = history.run_metric_names(db_session=db, run_id=run_id)
    return MetricNames(data=names, count=len(names))


@router.get("/runs/{run_id}/metrics", response_model=MetricsPage)
def read(
    run_id: RunId,
    db: SessionDep,
    name: Names = None,
    start: Start = None,
    end: End = None,
    cursor: Cursor = None,
    limit: Limit = 10_000,
    max_points: MaxPoints = None,
) -> Response:
    """Points grouped by metric, in step order; follow ``next_cursor``, or ask for
    ``max_points``."""
    run_service.get_run(db_session=db, run_id=run_id)
    limit = max(limit, max_points or 0)
    what = f"run {run_id}"
    return _page(db, [run_id], what, name, start, end, cursor, limit, max_points, False)


BATCH_BODY = {
    "requestBody": {
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/MetricBatchIn"}}},
        "required": True,
    }
}


@router.post(
    "/runs/{run_id}/metrics",
    response_model=BatchStored,
    responses=problem_responses(409),
    openapi_extra=BATCH_BODY,
)
async def log(
    run_id: RunId, request: Request, db: SessionDep, settings: SettingsDep, user: CurrentUser
) -> BatchStored:
    """Log a batch of an external run (many metrics and steps); re-sent points are ignored.

    Body: ``{"series": [{"metric": "loss", "steps": [3, 4], "values": [0.25, 0.2]}, …]}`` (the
    compact form) or ``{"points": [{"metric": "loss", "step": 3, "value": 0.25}, …]}``; a
    non-finite value is "NaN", "Infinity" or "-Infinity". Answers, once the batch is committed,
    how many points were received and how many were new.
    """
    body = await request.body()
    return await run_in_threadpool(_log, db, settings, user, run_id, body)


def _log(db: Session, settings: Settings, user: Caller, run_id: int, body: bytes) -> BatchStored:
    """Validate the JSON body in one pass (pydantic-core parses it: no dict per point is built
    twice) and store it."""
    try:
        batch = MetricBatchIn.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    series = batch.as_series(settings)
    limited(db, user, "max_metric_points", batch.size(), settings, stored=False)
    owner = None if user.admin else user.id
    stored = log_batch(db_session=db, run_id=run_id, series=series, owner_id=owner)
    return BatchStored(received=batch.size(), stored=stored)


EXPORT_FILE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "the points as CSV, or as a Parquet file",
        "content": {
            "text/csv": {"schema": {"type": "string"}},
            "application/vnd.apache.parquet": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
EXPORT = EXPORT_FILE | problem_responses(501)


@router.get("/runs/{run_id}/metrics/export", response_class=Response, responses=EXPORT)
def export_run(
    run_id: RunId,
    request: Request,
    db: SessionDep,
    format: ExportFormat = "csv",
    name: Names = None,
    start: Start = None,
    end: End = None,
) -> Response:
    """Every point as CSV or Parquet (columns run_id, metric, step, value)."""
    check_query(name, start, end)
    run_service.get_run(db_session=db, run_id=run_id)
    metric_ids = history.resolve(db_session=db, run_ids=[run_id], names=name, what=f"run {run_id}")
    filename = f"run-{run_id}-metrics"
    return export_response(request, [run_id], metric_ids, start, end, format, filename)


@router.get("/sweeps/{sweep_id}/metrics", response_model=SweepMetricsPage)
def read_sweep(
    sweep_id: SweepId,
    db: SessionDep,
    name: Names = None,
    start: Start = None,
    end: End = None,
    cursor: Cursor = None,
    limit: Limit = 10_000,
    max_points: MaxPoints = None,
) -> Response:
    """Points of every run of a sweep, grouped by run and metric, for comparisons.

    With ``max_points`` each run's series is downsampled and a page holds whole series.
    """
    run_service.get_sweep(db_session=db, sweep_id=sweep_id)
    run_ids = run_service.sweep_run_ids(db_session=db, sweep_id=sweep_id)
    what = f"no run of sweep {sweep_id}"
    return _page(db, run_ids, what, name, start, end, cursor, limit, max_points, True)


@router.get("/sweeps/{sweep_id}/metrics/export", response_class=Response, responses=EXPORT)
def export_sweep(
    sweep_id: SweepId,
    request: Request,
    db: SessionDep,
    format: ExportFormat = "csv",
    name: Names = None,
    start: Start = None,
    end: End = None,
) -> Response:
    """Every point of every run of a sweep as CSV or Parquet (run_id, metric, step, value)."""
    check_query(name, start, end)
    run_service.get_sweep(db_session=db, sweep_id=sweep_id)
    run_ids = run_service.sweep_run_ids(db_session=db, sweep_id=sweep_id)
    what = f"no run of sweep {sweep_id}"
    metric_ids = history.resolve(db_session=db, run_ids=run_ids, names=name, what=what)
    filename = f"sweep-{sweep_id}-metrics"
    return export_response(request, run_ids, metric_ids, start, end, format, filename)
