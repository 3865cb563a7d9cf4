"""History queries over REST on SQLite and PostgreSQL: several metrics, step ranges, keyset
pages, downsampling, a sweep's bulk read, CSV and Parquet exports, and the 4xx answers."""

from __future__ import annotations

import csv
import io
import math
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from services.db import make_engine, make_sessionmaker, session_scope
from services.metrics import write_points

V1 = "/api/v1"
SPEC = {"base": {"data": {"n": 8, "d": 4}, "steps": 5}, "grid": {"seed": [0, 1, 2]}}


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()  # type: ignore[no-any-return]


@pytest.fixture
def sweep(client: TestClient, db_url: str) -> Iterator[tuple[int, list[int], dict[int, list]]]:  # type: ignore[type-arg]
    """A sweep of three runs whose points the dispatcher's path wrote (run id -> points)."""
    created = client.post(f"{V1}/sweeps", json=SPEC).json()
    run_ids = created["run_ids"]
    written: dict[int, list] = {}  # type: ignore[type-arg]
    engine = make_engine(db_url)
    for i, run_id in enumerate(run_ids):
        points = [("loss", s, math.exp(-s / 500) + (s % 97) / 1e4) for s in range(3000 + 500 * i)]
        points += [("ntk_lambda_min", s, 0.1 + s / 1e5) for s in range(0, 3000, 10)]
        if i == 1:
            points += [("loss", 9000, math.nan), ("extra", 1, math.inf)]
        with session_scope(make_sessionmaker(engine)) as db:
            write_points(db_session=db, run_id=run_id, points=points)
        written[run_id] = points
    engine.dispose()
    yield created["id"], run_ids, written


def as_json(value: float) -> Any:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "Infinity" if value > 0 else "-Infinity"
    return value


def test_several_metrics_and_a_step_range_page_by_page(client: TestClient, sweep) -> None:  # type: ignore[no-untyped-def]
    _, run_ids, written = sweep
    run_id = run_ids[1]
    params: dict[str, Any] = {"name": ["ntk_lambda_min", "loss"], "start": 100, "end": 9000}
    params["limit"] = 333
    got: list[tuple[str, int, Any]] = []
    while True:
        page = client.get(f"{V1}/runs/{run_id}/metrics", params=params).json()
        assert page["count"] == len(page["data"]) <= 333
        got += [(p["metric"], p["step"], p["value"]) for p in page["data"]]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    want = sorted(
        (n, s, as_json(v))
        for n, s, v in written[run_id]
        if n in ("loss", "ntk_lambda_min") and 100 <= s <= 9000
    )
    assert [(n, s) for n, s, _ in got] == [(n, s) for n, s, _ in want]
    assert (
        got[-1] == ("ntk_lambda_min", 2990, pytest.approx(0.1299)) or got[-1][0] == "ntk_lambda_min"
    )
    assert ("loss", 9000, "NaN") in got


def test_downsampled_series_keep_extremes_and_ends(client: TestClient, sweep) -> None:  # type: ignore[no-untyped-def]
    _, run_ids, written = sweep
    run_id = run_ids[2]
    page = client.get(
        f"{V1}/runs/{run_id}/metrics", params={"name": "loss", "max_points": 100}
    ).json()
    assert page["next_cursor"] is None and 50 <= page["count"] <= 100
    values = [v for n, _, v in written[run_id] if n == "loss"]
    steps = [p["step"] for p in page["data"]]
    assert steps[0] == 0 and steps[-1] == len(values) - 1 and steps == sorted(set(steps))
    got = [p["value"] for p in page["data"]]
    assert min(got) == min(values) and max(got) == max(values)
    both = client.get(f"{V1}/runs/{run_id}/metrics", params={"max_points": 100}).json()
    assert {p["metric"] for p in both["data"]} == {"loss", "ntk_lambda_min"}
    problem(
        client.get(f"{V1}/runs/{run_id}/metrics", params={"max_points": 10, "cursor": "x"}), 422
    )
    problem(client.get(f"{V1}/runs/{run_id}/metrics", params={"max_points": 3}), 422)


def test_unknown_and_malformed_queries_get_problems(client: TestClient, sweep) -> None:  # type: ignore[no-untyped-def]
    sweep_id, run_ids, _ = sweep
    url = f"{V1}/runs/{run_ids[0]}/metrics"
    body = problem(client.get(url, params={"name": ["loss", "nope"]}), 404)
    assert "'nope'" in body["detail"] and "loss" in body["detail"]
    problem(client.get(url, params={"name": "bad name"}), 422)
    problem(client.get(url, params={"start": 10, "end": 5}), 422)
    problem(client.get(url, params={"cursor": "garbage"}), 422)
    problem(client.get(url, params={"limit": 0}), 422)
    problem(client.get(f"{V1}/runs/999999/metrics"), 404)
    problem(client.get(f"{V1}/sweeps/{sweep_id}/metrics", params={"name": "nope"}), 404)
    problem(client.get(f"{V1}/sweeps/999999/metrics"), 404)
    problem(client.get(f"{url}/export", params={"format": "xlsx"}), 422)


def test_a_sweeps_bulk_read_pages_through_every_run_once(client: TestClient, sweep) -> None:  # type: ignore[no-untyped-def]
    sweep_id, run_ids, written = sweep
    params: dict[str, Any] = {"name": "loss", "limit": 1234}
    got = []
    while True:
        page = client.get(f"{V1}/sweeps/{sweep_id}/metrics", params=params).json()
        got += [(p["run_id"], p["metric"], p["step"]) for p in page["data"]]
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    want = [(r, n, s) for r in run_ids for n, s, _ in written[r] if n == "loss"]
    assert got == sorted(want)


def test_a_sweeps_downsampled_read_pages_whole_series(client: TestClient, sweep) -> None:  # type: ignore[no-untyped-def]
    sweep_id, run_ids, _ = sweep
    params: dict[str, Any] = {"max_points": 50, "limit": 120}
    series: dict[tuple[int, str], list[int]] = {}
    pages = 0
    while True:
        page = client.get(f"{V1}/sweeps/{sweep_id}/metrics", params=params).json()
        pages += 1
        for p in page["data"]:
            series.setdefault((p["run_id"], p["metric"]), []).append(p["step"])
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert pages > 1
    assert sorted(series) == sorted(
        [(r, n) for r in run_ids for n in ("loss", "ntk_lambda_min")] + [(run_ids[1], "extra")]
    )
    assert all(len(steps) <= 50 and steps == sorted(set(steps)) for steps in series.values())
    problem(
        client.get(f"{V1}/sweeps/{sweep_id}/metrics", params={"max_points": 50, "limit": 10}), 422
    )


def test_csv_and_parquet_exports_hold_every_point(client: TestClient, sweep) -> None:  # type: ignore[no-untyped-def]
    import pyarrow.parquet as pq

    sweep_id, run_ids, written = sweep
    response = client.get(f"{V1}/runs/{run_ids[1]}/metrics/export")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(response.text)))
    assert len(rows) == len(written[run_ids[1]])
    by_key = {(r["metric"], int(r["step"])): r["value"] for r in rows}
    assert by_key[("loss", 9000)] == "NaN" and by_key[("extra", 1)] == "Infinity"
    assert float(by_key[("loss", 7)]) == next(
        v for n, s, v in written[run_ids[1]] if (n, s) == ("loss", 7)
    )

    response = client.get(
        f"{V1}/sweeps/{sweep_id}/metrics/export", params={"format": "parquet", "start": 1}
    )
    assert response.status_code == 200
    table = pq.read_table(io.BytesIO(response.content)).to_pydict()
    total = sum(1 for r in run_ids for _, s, _ in written[r] if s >= 1)
    assert len(table["step"]) == total and set(table["run_id"]) == set(run_ids)
    values = {
        (r, m, s): v
        for r, m, s, v in zip(
            table["run_id"], table["metric"], table["step"], table["value"], strict=True
        )
    }
    assert math.isnan(values[(run_ids[1], "loss", 9000)])
    assert values[(run_ids[1], "extra", 1)] == math.inf


def test_parquet_without_pyarrow_is_a_501_problem(
    client: TestClient,
    sweep,
    monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
) -> None:
    _, run_ids, _ = sweep
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    body = problem(
        client.get(f"{V1}/runs/{run_ids[0]}/metrics/export", params={"format": "parquet"}), 501
    )
    assert "pyarrow" in body["detail"]
