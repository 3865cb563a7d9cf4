"""Metric histories: log a batch, read pages or downsampled series, bulk-read a sweep, export.

Non-finite values are the JSON strings "NaN", "Infinity" and "-Infinity", in and out. Pages
are encoded by hand (a 100k-point page would spend most of its time in generic serializers);
the response models document the shapes.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterator, Sequence
from typing import Annotated, Any, Literal, cast

from fastapi import APIRouter, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from api.deps import SettingsDep
from api.problems import problem
from api.schemas import MetricNames, MetricsPage
from api.sessions import CommittedSessionDep as SessionDep
from services import history
from services import runs as run_service
from services.errors import FieldError, NotFound, SpecError
from services.exports import ParquetUnavailable, csv_chunks, parquet_file
from services.external_runs import MetricBatchIn, log_batch
from services.metrics import NAME_PATTERN
from services.settings import Settings

router = APIRouter(tags=["metrics"])

Names = Annotated[
    list[str] | None, Query(description="metric names (repeatable); default: every metric")
]
Start = Annotated[int | None, Query(ge=0, description="first step, inclusive")]
End = Annotated[int | None, Query(ge=0, description="last step, inclusive")]
Cursor = Annotated[str | None, Query(description="next_cursor of the previous page")]
Limit = Annotated[int, Query(ge=1, le=100_000, description="points per page")]
MaxPoints = Annotated[
    int | None,
    Query(
        ge=4,
        le=100_000,
        description="downsample each series to at most this many points (min and max per "
        "bucket, first and last kept); the whole result comes in one page",
    ),
]

ExportFormat = Literal["csv", "parquet"]


class SweepMetricPoint(BaseModel):
    run_id: int
    metric: str
    step: int
    value: float | str


class SweepMetricsPage(BaseModel):
    data: list[SweepMetricPoint]
    count: int
    next_cursor: str | None


class BatchStored(BaseModel):
    received: int
    stored: int


def encode_cursor(*parts: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(list(parts)).encode()).decode()


def decode_cursor(cursor: str, types: Sequence[type]) -> tuple[Any, ...]:
    try:
        parts = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if len(parts) != len(types) or not all(
            type(part) is kind for part, kind in zip(parts, types, strict=True)
        ):
            raise ValueError
    except ValueError as exc:
        raise SpecError([FieldError("cursor", cursor, "not a cursor this API returned")]) from exc
    return tuple(parts)


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


def value_json(value: float | None) -> str:
    if value is None or value != value:
        return '"NaN"'
    if value == float("inf"):
        return '"Infinity"'
    if value == float("-inf"):
        return '"-Infinity"'
    return repr(value)


def points_json(series: Sequence[history.Series], with_run: bool = False) -> str:
    """The objects of a page's ``data`` array, comma-separated."""
    inf = float("inf")
    chunks = []
    for s in series:
        prefix = f'{{"run_id":{s.run_id},' if with_run else "{"
        prefix += f'"metric":{json.dumps(s.metric)},"step":'
        values = [
            repr(v) if v is not None and -inf < v < inf else value_json(v) for _, v in s.points
        ]
        chunks += [
            f'{prefix}{step},"value":{value}}}'
            for (step, _), value in zip(s.points, values, strict=True)
        ]
    return ",".join(chunks)


def page_response(
    series: Sequence[history.Series], next_cursor: str | None, with_run: bool = False
) -> Response:
    count = sum(len(s.points) for s in series)
    cursor = json.dumps(next_cursor)
    body = f'{{"data":[{points_json(series, with_run)}],"count":{count},"next_cursor":{cursor}}}'
    return Response(body, media_type="application/json")


def export_response(
    request: Request,
    run_ids: list[int],
    names: Sequence[str] | None,
    start: int | None,
    end: int | None,
    format: ExportFormat,
    filename: str,
) -> Response:
    chunks = history.export_series(
        sessions=request.app.state.sessions, run_ids=run_ids, names=names, start=start, end=end
    )
    if format == "csv":
        headers = {"Content-Disposition": f'attachment; filename="{filename}.csv"'}
        return StreamingResponse(csv_chunks(chunks), media_type="text/csv", headers=headers)
    try:
        file = parquet_file(chunks)
    except ParquetUnavailable as exc:
        return problem(501, "Not implemented", str(exc))

    def read() -> Iterator[bytes]:
        with file:
            while block := file.read(1 << 20):
                yield block

    headers = {"Content-Disposition": f'attachment; filename="{filename}.parquet"'}
    return StreamingResponse(read(), media_type="application/vnd.apache.parquet", headers=headers)


@router.get("/runs/{run_id}/metric-names", response_model=MetricNames)
def metric_names(run_id: int, db: SessionDep) -> MetricNames:
    """The names of the metrics this run has recorded."""
    run_service.get_run(db_session=db, run_id=run_id)
    names = history.run_metric_names(db_session=db, run_id=run_id)
    return MetricNames(data=names, count=len(names))


@router.get("/runs/{run_id}/metrics", response_model=MetricsPage)
def read(
    run_id: int,
    db: SessionDep,
    name: Names = None,
    start: Start = None,
    end: End = None,
    cursor: Cursor = None,
    limit: Limit = 10_000,
    max_points: MaxPoints = None,
) -> Response:
    """Points ordered by (metric, step); follow ``next_cursor``, or ask for ``max_points``."""
    check_query(name, start, end)
    run_service.get_run(db_session=db, run_id=run_id)
    if max_points is not None:
        if cursor:
            raise SpecError([FieldError("cursor", cursor, "a downsampled read has one page")])
        series = history.read_downsampled(
            db_session=db, run_id=run_id, names=name, start=start, end=end, max_points=max_points
        )
        return page_response(series, None)
    after = cast(tuple[str, int], decode_cursor(cursor, (str, int))) if cursor else None
    series = history.read_page(
        db_session=db, run_id=run_id, names=name, start=start, end=end, after=after, limit=limit + 1
    )
    more = sum(len(s.points) for s in series) > limit
    if more:  # drop the probe point beyond the page
        last = series[-1]
        series[-1] = history.Series(last.run_id, last.metric, last.points[:-1])
        if not series[-1].points:
            series.pop()
    next_cursor = encode_cursor(series[-1].metric, series[-1].points[-1][0]) if more else None
    return page_response(series, next_cursor)


def _log(
    sessions: sessionmaker[Session],
    settings: Settings,
    run_id: int,
    body: bytes,
    committed: Callable[[], None],
) -> BatchStored:
    try:  # JSON parsed and validated in one pass (pydantic-core), not json.loads then pydantic
        batch = MetricBatchIn.model_validate_json(body)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc
    received = batch.size()
    if received > settings.max_batch_points:
        raise SpecError(
            [
                FieldError(
                    "series" if batch.series is not None else "points",
                    f"{received} points",
                    f"over the cap {settings.max_batch_points} per batch "
                    "(split it, or raise OVERPARAM_MAX_BATCH_POINTS)",
                )
            ]
        )
    series = batch.as_series()
    stored = log_batch(sessions=sessions, run_id=run_id, series=series)  # committed
    committed()
    return BatchStored(received=received, stored=stored)


@router.post(
    "/runs/{run_id}/metrics",
    response_model=BatchStored,
    openapi_extra={
        "requestBody": {
            "content": {"application/json": {"schema": MetricBatchIn.model_json_schema()}},
            "required": True,
        }
    },
)
async def log(run_id: int, request: Request, settings: SettingsDep) -> BatchStored:
    """Log a batch of an external run (many metrics and steps); re-sent points are ignored.

    Body: ``{"series": [{"metric": "loss", "steps": [3, 4], "values": [0.25, 0.2]}, …]}`` (the
    compact form, fastest to ingest) or ``{"points": [{"metric": "loss", "step": 3, "value":
    0.25}, …]}``; a non-finite value is "NaN", "Infinity" or "-Infinity". Answers how many
    points were received and stored.
    """
    body = await request.body()
    # One worker thread does it all: validation, the transaction and its commit.
    state = request.app.state
    return await run_in_threadpool(
        _log, state.sessions, settings, run_id, body, state.deferred.notify
    )


@router.get("/runs/{run_id}/metrics/export", response_model=None)
def export_run(
    run_id: int,
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
    if name:
        history.resolve_names(db_session=db, run_id=run_id, names=name)
    return export_response(request, [run_id], name, start, end, format, f"run-{run_id}-metrics")


def _sweep_runs(db: Any, sweep_id: int, names: Sequence[str] | None) -> list[int]:
    run_service.get_sweep(db_session=db, sweep_id=sweep_id)
    run_ids = history.sweep_run_ids(db_session=db, sweep_id=sweep_id)
    if names:
        seen: set[str] = set()
        for run_id in run_ids:
            seen |= set(history.run_metric_ids(db_session=db, run_id=run_id))
        unknown = sorted(set(names) - seen)
        if unknown:
            raise NotFound(
                f"no run of sweep {sweep_id} has a metric named {', '.join(map(repr, unknown))}"
            )
    return run_ids


@router.get("/sweeps/{sweep_id}/metrics", response_model=SweepMetricsPage)
def read_sweep(
    sweep_id: int,
    db: SessionDep,
    name: Names = None,
    start: Start = None,
    end: End = None,
    cursor: Cursor = None,
    limit: Limit = 10_000,
    max_points: MaxPoints = None,
) -> Response:
    """Points of every run of a sweep, ordered by (run, metric, step), for comparisons.

    With ``max_points`` each run's series is downsampled and a page holds whole series.
    """
    check_query(name, start, end)
    if max_points is not None and max_points > limit:
        raise SpecError([FieldError("max_points", max_points, f"must be ≤ limit ({limit})")])
    run_ids = _sweep_runs(db, sweep_id, name)
    after = cast(tuple[int, str, int], decode_cursor(cursor, (int, str, int))) if cursor else None
    series, more = history.read_sweep_page(
        db_session=db,
        run_ids=run_ids,
        names=name,
        start=start,
        end=end,
        after=after,
        limit=limit,
        max_points=max_points,
    )
    next_cursor = None
    if more and series:
        last = series[-1]
        next_cursor = encode_cursor(last.run_id, last.metric, last.points[-1][0])
    elif more:  # only reachable with limit < one series: the caller must ask for more
        raise SpecError([FieldError("limit", limit, "too small for one downsampled series")])
    return page_response(series, next_cursor, with_run=True)


@router.get("/sweeps/{sweep_id}/metrics/export", response_model=None)
def export_sweep(
    sweep_id: int,
    request: Request,
    db: SessionDep,
    format: ExportFormat = "csv",
    name: Names = None,
    start: Start = None,
    end: End = None,
) -> Response:
    """Every point of every run of a sweep as CSV or Parquet (run_id, metric, step, value)."""
    check_query(name, start, end)
    run_ids = _sweep_runs(db, sweep_id, name)
    return export_response(request, run_ids, name, start, end, format, f"sweep-{sweep_id}-metrics")
