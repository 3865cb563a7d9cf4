"""History reads: overparam vs an MLflow tracking server, on SQLite and PostgreSQL.

    .venv/bin/python -m benchmarks.query_bench [--reps 15] [--mlflow-reps 3] [--readers 16]
                                              [--backends sqlite,postgresql]

- Full read of a 100k-point history over REST: ``GET /api/v1/runs/{id}/metrics?name=loss&
  limit=100000`` (one page) vs MLflow's ``GET /api/2.0/mlflow/metrics/get-history`` (no
  ``max_results``: one response), timed until the whole answer has arrived (both answers are
  checked once, untimed), with the floor of reading the same chunks through the driver and
  decoding them (no JSON). Target: ≥ 40× faster than MLflow.
- The same read by 16 concurrent clients (threads, one request at a time each) against each
  server: reads per second. Target: ≥ 30× MLflow's throughput.
- A 1M-point history downsampled to 1,000 points over REST (``max_points=1000``), against what a
  store without chunk summaries would do: read every chunk and take each bucket's min and max
  with numpy. Target: median ≤ 20 ms.

The histories are the same points in both stores; MLflow's 100k points are inserted straight
into its ``metrics`` table (logging them through its REST API would take minutes), which is
the only table its get-history reads. Timings are medians over repetitions that alternate
between the compared paths. MLflow 3.17.2 runs from its own virtualenv (benchmarks/harness.py);
both servers run one uvicorn worker.
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import psycopg
from sqlalchemy import select
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
from services.history import series_of
from services.metrics import write_points
from services.migrate import upgrade
from services.models import MetricChunk, Run

FULL, BIG = 100_000, 1_000_000


def value(step: int) -> float:
    return math.exp(-step / 30_000) * (1 + 0.05 * math.sin(step / 17)) + 1e-4 * (step % 13)


def store_ours(url: str) -> tuple[int, int, int, int]:
    """(100k-point run, its metric id, 1M-point run, its metric id) written via write_points."""
    upgrade(url)
    engine = make_engine(url)
    sessions = make_sessionmaker(engine)
    run_ids = []
    for n in (FULL, BIG):
        with session_scope(sessions) as db:
            run = Run(config={}, status="succeeded", external=True)
            db.add(run)
            db.flush()
            run_ids.append(run.id)
        for first in range(0, n, 20_000):
            points = [("loss", s, value(s)) for s in range(first, min(n, first + 20_000))]
            with session_scope(sessions) as db:
                write_points(db_session=db, run_id=run_ids[-1], points=points)
    with session_scope(sessions) as db:
        ids = [series_of(db_session=db, run_ids=[r])[r]["loss"] for r in run_ids]
    engine.dispose()
    return run_ids[0], ids[0], run_ids[1], ids[1]


def store_mlflow(url: str, database_url: str) -> str:
    """A run holding the same 100k points, inserted into MLflow's ``metrics`` table."""
    with httpx.Client(base_url=url, timeout=600) as http:
        run_id = mlflow_run(http)
    rows = [("loss", value(s), 1_700_000_000_000 + s, run_id, s, False) for s in range(FULL)]
    sql = "INSERT INTO metrics (key, value, timestamp, run_uuid, step, is_nan) VALUES "
    if database_url.startswith("sqlite"):
        with sqlite3.connect(database_url.removeprefix("sqlite:///")) as conn:
            conn.executemany(sql + "(?, ?, ?, ?, ?, ?)", rows)
    else:
        with psycopg.connect(database_url.replace("postgresql+psycopg", "postgresql")) as conn:
            copy_sql = "COPY metrics (key, value, timestamp, run_uuid, step, is_nan) FROM STDIN"
            with conn.cursor() as cur, cur.copy(copy_sql) as copy:
                for row in rows:
                    copy.write_row(row)
    return run_id


def raw_chunks(sessions: sessionmaker[Session], run_id: int, metric_id: int) -> Points:
    """Every chunk of one history through the driver, decoded: the floor of any read."""
    with session_scope(sessions) as db:
        rows = db.execute(
            select(MetricChunk.step_array, MetricChunk.value_array)
            .where(MetricChunk.run_id == run_id, MetricChunk.metric_id == metric_id)
            .order_by(MetricChunk.last_step)
        ).all()
    return Points.join([Points.decode(steps, values) for steps, values in rows])


def numpy_buckets(points: Points, buckets: int) -> tuple[np.ndarray, np.ndarray]:
    """Each bucket's min and max from every point (what a store without summaries does)."""
    index = (points.steps - points.steps[0]) * buckets // (points.steps[-1] - points.steps[0] + 1)
    starts = np.flatnonzero(np.r_[True, index[1:] != index[:-1]])
    return np.minimum.reduceat(points.values, starts), np.maximum.reduceat(points.values, starts)


def throughput(read: Callable[[], object], readers: int, reads_each: int) -> float:
    """Reads per second of ``readers`` threads each doing ``reads_each`` reads."""
    start = time.perf_counter()
    with ThreadPoolExecutor(readers) as pool:
        list(pool.map(lambda _: [read() for _ in range(reads_each)], range(readers)))
    return readers * reads_each / (time.perf_counter() - start)


def medians(paths: dict[str, Callable[[], object]], reps: dict[str, int]) -> dict[str, float]:
    """Median seconds of each path; paths alternate within every round (after one warm-up)."""
    times: dict[str, list[float]] = {name: [] for name in paths}
    for fn in paths.values():
        fn()
    for round_ in range(max(reps.values())):
        for name, fn in paths.items():
            if round_ < reps[name]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench(
    backend: Backend, reps: int, mlflow_reps: int, readers: int
) -> tuple[list[list[str]], list[list[str]]]:
    full_run, full_metric, big_run, big_metric = store_ours(backend.ours)
    engine = make_engine(backend.ours)
    sessions = make_sessionmaker(engine)
    with (
        tempfile.TemporaryDirectory() as artifacts,
        serve_ours(backend.ours) as ours,
        serve_mlflow(backend.mlflow, artifacts) as mlflow,
    ):
        mlflow_id = store_mlflow(mlflow, backend.mlflow)
        local = threading.local()

        def client(base: str) -> httpx.Client:  # one keep-alive connection per thread
            if not hasattr(local, base):
                setattr(local, base, httpx.Client(base_url=base, timeout=3600))
            return getattr(local, base)  # type: ignore[no-any-return]

        full_path = f"/api/v1/runs/{full_run}/metrics"
        full_params = {"name": "loss", "limit": FULL}
        history_params = {"run_id": mlflow_id, "metric_key": "loss"}
        # Checked once; the timed reads take the whole answer and stop there (a client's own
        # JSON parsing is the same work whichever server sent the points).
        page = client(ours).get(full_path, params=full_params).json()
        assert page["count"] == FULL and page["next_cursor"] is None
        history = client(mlflow).get("/api/2.0/mlflow/metrics/get-history", params=history_params)
        assert len(history.json()["metrics"]) == FULL

        def ours_full() -> None:
            client(ours).get(full_path, params=full_params).raise_for_status()

        def mlflow_full() -> None:
            path = "/api/2.0/mlflow/metrics/get-history"
            client(mlflow).get(path, params=history_params).raise_for_status()

        full = medians(
            {
                "ours": ours_full,
                "mlflow": mlflow_full,
                "raw": lambda: raw_chunks(sessions, full_run, full_metric),
            },
            {"ours": reps, "mlflow": mlflow_reps, "raw": reps},
        )
        concurrent = {
            "ours": throughput(ours_full, readers, 4),
            "mlflow": throughput(mlflow_full, readers, 1),
        }

        def ours_downsampled() -> None:
            params = {"name": "loss", "max_points": 1000}
            page = client(ours).get(f"/api/v1/runs/{big_run}/metrics", params=params).json()
            assert 900 <= page["count"] <= 1000

        small = medians(
            {
                "ours": ours_downsampled,
                "raw": lambda: numpy_buckets(raw_chunks(sessions, big_run, big_metric), 500),
            },
            {"ours": reps * 4, "raw": reps},
        )
    engine.dispose()
    name = backend.name
    full_rows = [
        [name, "MLflow REST get-history", f"{full['mlflow'] * 1000:,.0f} ms", "1.0×", ""],
        [
            name,
            "overparam REST (one page)",
            f"{full['ours'] * 1000:,.1f} ms",
            f"{full['mlflow'] / full['ours']:.0f}× faster than MLflow",
            "≥ 40×",
        ],
        [
            name,
            "chunks read and decoded (no JSON)",
            f"{full['raw'] * 1000:,.1f} ms",
            f"overparam = {full['ours'] / full['raw']:.1f}× this",
            "",
        ],
        [
            name,
            f"MLflow, {readers} concurrent readers",
            f"{concurrent['mlflow']:.2f} reads/s",
            "1.0×",
            "",
        ],
        [
            name,
            f"overparam, {readers} concurrent readers",
            f"{concurrent['ours']:.1f} reads/s",
            f"{concurrent['ours'] / concurrent['mlflow']:.0f}× MLflow's throughput",
            "≥ 30×",
        ],
    ]
    small_rows = [
        [
            name,
            "overparam REST max_points=1000",
            f"{small['ours'] * 1000:,.1f}",
            f"{small['raw'] / small['ours']:.1f}× faster than reading every point",
            "≤ 20 ms",
        ],
        [name, "every chunk read, numpy min/max", f"{small['raw'] * 1000:,.1f}", "", ""],
    ]
    return full_rows, small_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--mlflow-reps", type=int, default=3, help="each takes seconds")
    parser.add_argument("--readers", type=int, default=16, help="concurrent clients")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    full_rows, small_rows = [], []
    load = os.getloadavg()[0]
    with backends(args.backends.split(",")) as selected:
        for backend in selected:
            full, small = bench(backend, args.reps, args.mlflow_reps, args.readers)
            full_rows += full
            small_rows += small
    where = f"load average {load:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    print_table(
        f"Full read of a 100k-point history (median; {where})",
        ["backend", "path", "median", "ratio", "target"],
        full_rows,
    )
    print_table(
        "A 1M-point history downsampled to 1,000 points (median ms)",
        ["backend", "path", "median ms", "ratio", "target"],
        small_rows,
    )


if __name__ == "__main__":
    main()
