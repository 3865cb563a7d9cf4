"""Ingestion: overparam vs an MLflow tracking server vs a raw insert of the same chunks, on
SQLite and PostgreSQL.

    .venv/bin/python -m benchmarks.ingest_bench [--batches 100] [--mlflow-batches N]
                                               [--backends sqlite,postgresql]

MLflow 3.17.2 runs from its own virtualenv (``.venv-mlflow``, created on first use; see
benchmarks/harness.py). Every path writes the same 1,000-point batches (500 steps × 2 metrics),
one request or transaction per batch, into a database of its own on the same backend. The
compared paths alternate in blocks of 10 batches (both servers up, one request at a time), so a
change in the machine's load affects both sides of a ratio alike:

- REST: ``POST /api/v1/runs/{id}/metrics`` to an external run, with the compact ``series`` body
  and with the like-for-like ``points`` body (one object per point, as MLflow's), vs MLflow's
  ``POST /api/2.0/mlflow/runs/log-batch`` (1,000 metrics is MLflow's cap per call). Each answer
  comes after its commit: nothing is deferred, so the clock sees all the work.
- the dispatcher's internal path: ``services.metrics.write_series`` in one transaction per
  batch, on the batch's columns as the worker sends them (``MetricBatch``), against the floor:
  the same chunk rows, built before the clock starts, written raw into ``metric_chunk``
  (binary ``COPY`` on PostgreSQL, ``executemany`` on SQLite) with nothing else (no name
  lookup, no overlap check, no encoding).

Prints points/s and the ratios the targets are stated in (≥ 25× MLflow over REST with the
points body; internal path ≥ 70% of the raw floor). A benchmark, not a test: numbers vary with
the machine's load.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import tempfile
import time
import urllib.parse
from collections.abc import Callable
from functools import partial
from typing import Any

import httpx
import psycopg
from sqlalchemy.orm import Session, sessionmaker

from benchmarks.harness import (
    Backend,
    backends,
    mlflow_run,
    print_table,
    serve_mlflow,
    serve_ours,
)
from services.chunks import Points
from services.db import make_engine, make_sessionmaker, session_scope
from services.metrics import Point, metric_ids, write_series
from services.models import Run
from worker.events import MetricBatch

STEPS_PER_BATCH = 500
METRICS = ("train/loss", "ntk_lambda_min")
BLOCK = 10  # batches per side before the REST paths alternate


def batch_points(index: int) -> list[Point]:
    first = index * STEPS_PER_BATCH
    return [
        (name, step, math.exp(-step / 20_000) + 1e-3 * ((step * 7919) % 101))
        for step in range(first, first + STEPS_PER_BATCH)
        for name in METRICS
    ]


class Timer:
    """Seconds spent per path; paths alternate, so load changes hit all alike."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.points: dict[str, int] = {}

    def time(self, path: str, points: int, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        self.seconds[path] = self.seconds.get(path, 0.0) + time.perf_counter() - start
        self.points[path] = self.points.get(path, 0) + points

    def rate(self, path: str) -> float:
        return self.points[path] / self.seconds[path]


def series_body(points: list[tuple[str, int, float]]) -> bytes:
    """The compact body: per metric, its steps and its values."""
    grouped: dict[str, tuple[list[int], list[float]]] = {}
    for name, step, value in points:
        grouped.setdefault(name, ([], []))
        grouped[name][0].append(step)
        grouped[name][1].append(value)
    series = [{"metric": n, "steps": s, "values": v} for n, (s, v) in grouped.items()]
    return json.dumps({"series": series}).encode()


def points_body(points: list[tuple[str, int, float]]) -> bytes:
    """One object per point."""
    return json.dumps(
        {"points": [{"metric": n, "step": s, "value": v} for n, s, v in points]}
    ).encode()


def rest_paths(
    timer: Timer, ours: str, ours_url: str, mlflow: str, batches: int, mlflow_batches: int
) -> None:
    """Both servers up, one request at a time, alternating in blocks of BLOCK batches."""
    data = [batch_points(i) for i in range(batches + 2)]
    with (
        httpx.Client(base_url=ours, timeout=600) as a,
        httpx.Client(base_url=mlflow, timeout=600) as b,
    ):
        new = partial(a.post, "/api/v1/runs", json={"config": {}, "external": True})
        series_run, points_run = new().json()["id"], new().json()["id"]
        mlflow_id = mlflow_run(b)

    def mlflow_body(points: list[tuple[str, int, float]]) -> bytes:
        metrics = [
            {"key": n, "value": v, "timestamp": 1_700_000_000_000 + s, "step": s}
            for n, s, v in points
        ]
        return json.dumps({"run_id": mlflow_id, "metrics": metrics}).encode()

    # Request bodies are encoded before the clock starts, and the timed requests go through
    # one keep-alive http.client connection per path (a thinner client than httpx, which
    # adds about a millisecond per request): the servers are measured, not the client.
    paths = {
        "ours series": (poster(ours, f"/api/v1/runs/{series_run}/metrics"), series_body),
        "ours points": (poster(ours, f"/api/v1/runs/{points_run}/metrics"), points_body),
        "mlflow": (poster(mlflow, "/api/2.0/mlflow/runs/log-batch"), mlflow_body),
    }
    bodies = {path: [encode(points) for points in data] for path, (_, encode) in paths.items()}
    for path, (post, _) in paths.items():  # warm-up
        for body in bodies[path][:2]:
            post(body)
    # Alternate in blocks of BLOCK batches: load drift still hits every path alike, and
    # whatever a server does after answering (its own commit, logging, GC) falls into its
    # own block instead of the other server's next request.
    for first in range(2, batches + 2, BLOCK):
        for path, (post, _) in paths.items():
            last = min(first + BLOCK, batches + 2)
            if path == "mlflow":
                last = min(last, mlflow_batches + 2)
            for i in range(first, last):
                timer.time(path, len(data[i]), partial(post, bodies[path][i]))


def poster(base_url: str, path: str) -> Callable[[bytes], None]:
    """POST a JSON body to ``path`` on one keep-alive connection; raise unless it is 200."""
    parsed = urllib.parse.urlsplit(base_url)
    conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port, timeout=600)
    headers = {"content-type": "application/json"}

    def post(body: bytes) -> None:
        conn.request("POST", path, body=body, headers=headers)
        response = conn.getresponse()
        answer = response.read()
        if response.status != 200:
            raise RuntimeError(f"POST {base_url}{path}: {response.status} {answer[:500]!r}")

    return post


def new_run(sessions: sessionmaker[Session]) -> int:
    with session_scope(sessions) as db:
        run = Run(config={}, status="running", external=True)
        db.add(run)
        db.flush()
        return run.id


def chunk_rows(run_id: int, ids: dict[str, int], points: list[Point]) -> list[dict[str, Any]]:
    """The ``metric_chunk`` rows write_points stores for a batch with no stored neighbours."""
    grouped: dict[str, tuple[list[int], list[float]]] = {}
    for name, step, value in points:
        grouped.setdefault(name, ([], []))
        grouped[name][0].append(step)
        grouped[name][1].append(value)
    return [
        {"run_id": run_id, "metric_id": ids[name]} | piece.chunk_row()
        for name, (steps, values) in grouped.items()
        for piece in Points.of(steps, values).pieces()
    ]


def internal_paths(timer: Timer, url: str, batches: int) -> str:
    """write_points per batch (the dispatcher's path) alternating with the raw floor."""
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    ours_run, raw_run = new_run(sessions), new_run(sessions)
    with session_scope(sessions) as db:
        ids = metric_ids(db_session=db, names=METRICS)
    data = [batch_points(i) for i in range(batches + 2)]
    rows = [chunk_rows(raw_run, ids, points) for points in data]
    columns = list(rows[0][0])
    if url.startswith("sqlite"):
        import sqlite3

        conn: Any = sqlite3.connect(url.removeprefix("sqlite:///"))
        conn.execute("PRAGMA synchronous=NORMAL")
        marks = ", ".join(f":{c}" for c in columns)
        sql = f"INSERT INTO metric_chunk ({', '.join(columns)}) VALUES ({marks})"
        floor = "raw executemany"

        def raw(index: int) -> None:
            conn.executemany(sql, rows[index])
            conn.commit()
    else:
        conn = psycopg.connect(url.replace("postgresql+psycopg", "postgresql"))
        copy_sql = f"COPY metric_chunk ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)"
        kinds = ["int4", "int4", "int8", "int8", "int4", "float8", "float8"]
        kinds += ["int8", "float8", "int8", "float8", "bytea", "bytea"]
        order = [
            "run_id", "metric_id", "last_step", "first_step", "count", "first_value",
            "last_value", "min_step", "min_value", "max_step", "max_value", "step_array",
            "value_array",
        ]  # fmt: skip
        types = dict(zip(order, kinds, strict=True))
        floor = "raw COPY"

        def raw(index: int) -> None:
            with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                copy.set_types([types[c] for c in columns])
                for row in rows[index]:
                    copy.write_row([row[c] for c in columns])
            conn.commit()

    batches = [MetricBatch.of(points) for points in data]  # built by the worker, off the clock

    def internal(index: int) -> None:
        with session_scope(sessions) as db:
            write_series(db_session=db, run_id=ours_run, series=batches[index].series)

    for index in range(2):
        internal(index)
        raw(index)
    for first in range(2, len(data), BLOCK):
        block = range(first, min(first + BLOCK, len(data)))
        for index in block:
            timer.time("internal", len(data[index]), partial(internal, index))
        for index in block:
            timer.time("raw", len(data[index]), partial(raw, index))
    conn.close()
    engine.dispose()
    return floor


def bench(backend: Backend, batches: int, mlflow_batches: int) -> list[list[str]]:
    timer = Timer()
    with (
        tempfile.TemporaryDirectory() as artifacts,
        serve_ours(backend.ours) as ours,
        serve_mlflow(backend.mlflow, artifacts) as mlflow,
    ):
        rest_paths(timer, ours, backend.ours, mlflow, batches, mlflow_batches)
    floor = internal_paths(timer, backend.ours, batches)
    mlflow_rate, internal, raw = (timer.rate(path) for path in ("mlflow", "internal", "raw"))
    rest = [
        [
            backend.name,
            f"overparam REST, {body} body",
            f"{timer.rate(f'ours {body}'):,.0f}",
            f"{timer.rate(f'ours {body}') / mlflow_rate:.1f}× MLflow",
            "≥ 25×",
        ]
        for body in ("series", "points")
    ]
    return [
        [backend.name, "MLflow REST log-batch", f"{mlflow_rate:,.0f}", "1.0× MLflow", ""],
        *rest,
        [
            backend.name,
            "overparam internal (dispatcher)",
            f"{internal:,.0f}",
            f"{internal / raw:.0%} of {floor}",
            "≥ 70%",
        ],
        [backend.name, floor, f"{raw:,.0f}", "100%", ""],
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=100, help="1,000-point batches per path")
    parser.add_argument("--mlflow-batches", type=int, default=None, help="default: --batches")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    load = os.getloadavg()[0]
    with backends(args.backends.split(",")) as selected:
        for backend in selected:
            rows += bench(backend, args.batches, args.mlflow_batches or args.batches)
    print_table(
        "Ingestion, 1,000-point batches, one request / transaction each (points per second; "
        f"load average {load:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
        ["backend", "path", "points/s", "ratio", "target"],
        rows,
    )


if __name__ == "__main__":
    main()
