"""History reads: overparam vs an MLflow tracking server vs raw SQL, on SQLite and PostgreSQL.

    .venv/bin/python -m benchmarks.query_bench [--reps 15] [--mlflow-reps 3]
                                              [--backends sqlite,postgresql]

- Full read of a 100k-point history over REST: ``GET /api/v1/runs/{id}/metrics?name=loss&
  limit=100000`` (one page) vs MLflow's ``GET /api/2.0/mlflow/metrics/get-history`` (no
  ``max_results``: one response), with a raw ``SELECT step, value … ORDER BY step`` of the same
  rows through the driver as the floor. Target: ≥ 10× faster than MLflow.
- A 1M-point history downsampled to 1,000 points over REST (``max_points=1000``) vs the raw SQL
  query that computes the same buckets' min and max from the points
  (``services.rollups.downsample_raw_sql``). Targets: median ≤ 50 ms, within 3× of raw SQL.

The histories are the same rows in both stores; MLflow's 100k points are inserted straight
into its ``metrics`` table (logging them through its REST API would take minutes), which is
the only table its get-history reads. Timings are medians over repetitions that alternate
between the compared paths. MLflow 3.17.2 runs from its own virtualenv (benchmarks/harness.py).
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable

import httpx
import psycopg

from benchmarks.harness import (
    Backend,
    backends,
    mlflow_run,
    print_table,
    serve_mlflow,
    serve_ours,
)
from services.db import make_engine, make_sessionmaker, session_scope
from services.history import run_metric_ids
from services.metrics import write_points
from services.migrate import upgrade
from services.models import Run
from services.rollups import downsample_raw_sql

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
        ids = [run_metric_ids(db_session=db, run_id=r)["loss"] for r in run_ids]
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


def raw_select(database_url: str, run_id: int, metric_id: int) -> Callable[[], int]:
    sql = "SELECT step, value FROM metric WHERE run_id = {0} AND metric_id = {1} ORDER BY step"
    if database_url.startswith("sqlite"):
        conn: object = sqlite3.connect(database_url.removeprefix("sqlite:///"))
        query = sql.format("?", "?")
    else:
        conn = psycopg.connect(database_url.replace("postgresql+psycopg", "postgresql"))
        query = sql.format("%s", "%s")

    def read() -> int:
        return len(conn.execute(query, (run_id, metric_id)).fetchall())  # type: ignore[attr-defined]

    return read


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


def bench(backend: Backend, reps: int, mlflow_reps: int) -> tuple[list[list[str]], list[list[str]]]:
    full_run, full_metric, big_run, big_metric = store_ours(backend.ours)
    with (
        tempfile.TemporaryDirectory() as artifacts,
        serve_ours(backend.ours) as ours,
        serve_mlflow(backend.mlflow, artifacts) as mlflow,
        httpx.Client(base_url=ours, timeout=600) as a,
        httpx.Client(base_url=mlflow, timeout=3600) as b,
    ):
        mlflow_id = store_mlflow(mlflow, backend.mlflow)

        def ours_full() -> None:
            page = a.get(
                f"/api/v1/runs/{full_run}/metrics", params={"name": "loss", "limit": FULL}
            ).json()
            assert page["count"] == FULL and page["next_cursor"] is None

        def mlflow_full() -> None:
            response = b.get(
                "/api/2.0/mlflow/metrics/get-history",
                params={"run_id": mlflow_id, "metric_key": "loss"},
            )
            assert len(response.json()["metrics"]) == FULL

        floor = raw_select(backend.ours, full_run, full_metric)
        full = medians(
            {"ours": ours_full, "mlflow": mlflow_full, "raw": floor},
            {"ours": reps, "mlflow": mlflow_reps, "raw": reps},
        )

        def ours_downsampled() -> None:
            params = {"name": "loss", "max_points": 1000}
            page = a.get(f"/api/v1/runs/{big_run}/metrics", params=params).json()
            assert 500 <= page["count"] <= 1000

        engine = make_engine(backend.ours)
        sessions = make_sessionmaker(engine)

        def raw_buckets() -> None:
            with session_scope(sessions) as db:
                downsample_raw_sql(
                    db_session=db,
                    run_id=big_run,
                    metric_id=big_metric,
                    lo=0,
                    hi=BIG - 1,
                    max_points=1000,
                )

        small = medians(
            {"ours": ours_downsampled, "raw": raw_buckets}, {"ours": reps * 4, "raw": reps}
        )
        engine.dispose()
    name = backend.name
    full_rows = [
        [name, "MLflow REST get-history", f"{full['mlflow'] * 1000:,.0f}", "1.0×", ""],
        [
            name,
            "overparam REST (one page)",
            f"{full['ours'] * 1000:,.1f}",
            f"{full['mlflow'] / full['ours']:.0f}× faster than MLflow",
            "≥ 10×",
        ],
        [
            name,
            "raw SELECT (driver fetchall)",
            f"{full['raw'] * 1000:,.1f}",
            f"overparam = {full['ours'] / full['raw']:.1f}× raw",
            "",
        ],
    ]
    small_rows = [
        [
            name,
            "overparam REST max_points=1000",
            f"{small['ours'] * 1000:,.1f}",
            f"{small['ours'] / small['raw']:.2f}× raw SQL",
            "≤ 50 ms, ≤ 3× raw",
        ],
        [name, "raw SQL, same buckets (GROUP BY)", f"{small['raw'] * 1000:,.1f}", "1.00×", ""],
    ]
    return full_rows, small_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--mlflow-reps", type=int, default=3, help="each takes seconds")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    full_rows, small_rows = [], []
    load = os.getloadavg()[0]
    with backends(args.backends.split(",")) as selected:
        for backend in selected:
            full, small = bench(backend, args.reps, args.mlflow_reps)
            full_rows += full
            small_rows += small
    where = f"load average {load:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    print_table(
        f"Full read of a 100k-point history (median ms; {where})",
        ["backend", "path", "median ms", "ratio", "target"],
        full_rows,
    )
    print_table(
        "A 1M-point history downsampled to 1,000 points (median ms)",
        ["backend", "path", "median ms", "ratio", "target"],
        small_rows,
    )


if __name__ == "__main__":
    main()
