"""The REST API on SQLite and PostgreSQL: sweeps, runs, metrics, cancel, and every error shape."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import update

from services.db import make_engine, make_sessionmaker, session_scope
from services.metrics import write_points
from services.models import DispatcherRecord, utcnow

QUICK = {
    "name": "t",
    "base": {"arch": "two_layer", "data": {"n": 8, "d": 4}, "steps": 10},
    "grid": {"width": [16, 32], "seed": [0, 1, 2]},
}


def assert_problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["title"] and "detail" in body
    assert "Traceback" not in response.text
    return body  # type: ignore[no-any-return]


def fields(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["field"]: e for e in body["errors"]}


def test_create_sweep_expands_runs_in_one_transaction(client: TestClient) -> None:
    created = client.post("/api/v1/sweeps", json=QUICK)
    assert created.status_code == 201
    body = created.json()
    assert body["run_count"] == 6 and len(body["run_ids"]) == 6
    sweep = client.get(f"/api/v1/sweeps/{body['id']}").json()
    assert sweep["status_counts"] == {"queued": 6}
    assert sweep["spec"]["grid"] == QUICK["grid"]
    listed = client.get("/api/v1/runs", params={"sweep_id": body["id"]}).json()
    assert listed["count"] == 6
    assert all(r["config"] is None and r["manifest"] is None for r in listed["data"])
    params = {"sweep_id": body["id"], "fields": ["config"]}
    runs = client.get("/api/v1/runs", params=params).json()
    widths = sorted((r["config"]["width"], r["config"]["seed"]) for r in runs["data"])
    assert widths == [(w, s) for w in (16, 32) for s in (0, 1, 2)]
    assert all(r["manifest"] is None for r in runs["data"])


def test_a_dry_run_validates_and_expands_without_storing(client: TestClient) -> None:
    planned = client.post("/api/v1/sweeps", params={"dry_run": True}, json=QUICK)
    assert planned.status_code == 200, planned.text
    body = planned.json()
    assert body["name"] == "t" and body["run_count"] == 6 and len(body["runs"]) == 6
    first = body["runs"][0]
    assert first["overrides"] == {"width": 16, "seed": 0} and first["config"]["width"] == 16
    assert first["config"]["data"]["n"] == 8 and first["resources"]["cpus"] >= 1
    assert client.get("/api/v1/sweeps").json()["count"] == 0
    bad = client.post("/api/v1/sweeps", params={"dry_run": True}, json=QUICK | {"gird": {}})
    assert "did you mean 'grid'" in fields(assert_problem(bad, 422))["gird"]["reason"]


def test_run_json_carries_state_summary_and_manifest(client: TestClient) -> None:
    run_id = client.post("/api/v1/sweeps", json=QUICK).json()["run_ids"][0]
    run = client.get(f"/api/v1/runs/{run_id}").json()
    assert run["status"] == "queued" and run["attempt"] == 0 and run["error"] is None
    assert run["config"]["width"] == 16 and run["config"]["data"]["n"] == 8
    assert run["summary"] == {}
    manifest = run["manifest"]
    assert manifest["package_version"] and "git_commit" in manifest
    assert manifest["config"] == run["config"] and manifest["seed"] == 0


def test_list_filters_and_paginates(client: TestClient) -> None:
    first = client.post("/api/v1/sweeps", json=QUICK).json()
    second = client.post("/api/v1/sweeps", json=QUICK | {"grid": {"seed": [5]}}).json()
    assert client.get("/api/v1/sweeps").json()["count"] == 2
    assert client.get("/api/v1/runs").json()["count"] == 7
    assert client.get("/api/v1/runs", params={"sweep_id": second["id"]}).json()["count"] == 1
    client.post(f"/api/v1/runs/{first['run_ids'][0]}/cancel")
    cancelled = client.get("/api/v1/runs", params={"status": "cancelled"}).json()
    assert [r["id"] for r in cancelled["data"]] == [first["run_ids"][0]]
    page = client.get("/api/v1/runs", params={"limit": 3, "offset": 3}).json()
    assert [r["id"] for r in page["data"]] == first["run_ids"][3:6] and page["count"] == 7


def test_runs_filter_external_ones(client: TestClient) -> None:
    client.post("/api/v1/sweeps", json=QUICK)
    external = client.post("/api/v1/runs", json={"config": {"lr": 0.1}, "external": True}).json()
    listed = client.get("/api/v1/runs", params={"external": True}).json()
    assert [r["id"] for r in listed["data"]] == [external["id"]] and listed["data"][0]["external"]
    assert client.get("/api/v1/runs", params={"external": False}).json()["count"] == 6


def test_cancel_queued_then_conflict(client: TestClient) -> None:
    run_id = client.post("/api/v1/sweeps", json=QUICK).json()["run_ids"][0]
    assert client.post(f"/api/v1/runs/{run_id}/cancel").json()["status"] == "cancelled"
    assert_problem(client.post(f"/api/v1/runs/{run_id}/cancel"), 409)


def test_metrics_keyset_pagination_returns_every_point_once(
    client: TestClient, db_url: str
) -> None:
    run_id = client.post("/api/v1/sweeps", json=QUICK).json()["run_ids"][0]
    points = [("loss", s, 1.0 / (s + 1)) for s in range(57)]
    points += [("ntk_lambda_min", s, 0.5) for s in range(0, 57, 10)]
    points += [("loss", 57, float("nan")), ("loss", 58, float("inf")), ("loss", 59, float("-inf"))]
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        write_points(db_session=db, run_id=run_id, points=points)
        write_points(db_session=db, run_id=run_id, points=points[:10])  # re-sent: ignored
    engine.dispose()

    seen: list[tuple[str, int]] = []
    values: dict[tuple[str, int], Any] = {}
    params: dict[str, Any] = {"limit": 7}
    while True:
        page = client.get(f"/api/v1/runs/{run_id}/metrics", params=params).json()
        seen += [(p["metric"], p["step"]) for p in page["data"]]
        values |= {(p["metric"], p["step"]): p["value"] for p in page["data"]}
        if not page["next_cursor"]:
            break
        params["cursor"] = page["next_cursor"]
    assert len(seen) == len(set(seen)) == len(points)
    assert seen == sorted(seen)
    assert values[("loss", 57)] == "NaN"
    assert values[("loss", 58)] == "Infinity" and values[("loss", 59)] == "-Infinity"
    assert values[("loss", 3)] == pytest.approx(0.25)

    ranged = client.get(
        f"/api/v1/runs/{run_id}/metrics", params={"name": "loss", "start": 10, "end": 19}
    ).json()
    assert [p["step"] for p in ranged["data"]] == list(range(10, 20))
    names = client.get(f"/api/v1/runs/{run_id}/metric-names").json()
    assert names == {"data": ["loss", "ntk_lambda_min"], "count": 2}


@pytest.mark.parametrize(
    ("spec", "field", "value"),
    [
        (QUICK | {"grid": {"width": [16, -4]}}, "grid.width[1]", -4),
        (QUICK | {"base": {"arch": "transformer"}}, "base.arch", "transformer"),
        (QUICK | {"base": {"widht": 10}}, "base.widht", 10),
        (QUICK | {"grid": {"nonsense": [1]}}, "grid.nonsense", "nonsense"),
        (QUICK | {"colour": "red"}, "colour", "red"),
        (QUICK | {"grid": {"seed": list(range(2000))}}, "grid", 2000),
        (QUICK | {"base": {"width": 10**7}, "grid": {}}, "base.width", 10**7),
        (QUICK | {"base": {"data": {"n": 10**6}}}, "base.data.n", 10**6),
        (QUICK | {"base": {"lr": "fast"}}, "base.lr", "fast"),
        (QUICK | {"grid": {"width": 16}}, "grid.width", 16),
    ],
)
def test_bad_specs_get_422_naming_field_value_reason(
    client: TestClient, spec: dict[str, Any], field: str, value: Any
) -> None:
    body = assert_problem(client.post("/api/v1/sweeps", json=spec), 422)
    errs = fields(body)
    assert field in errs, errs
    assert errs[field]["value"] == value and errs[field]["reason"]
    assert client.get("/api/v1/sweeps").json()["count"] == 0, "a rejected sweep stores nothing"


def test_malformed_json_and_wrong_types(client: TestClient) -> None:
    body = assert_problem(
        client.post(
            "/api/v1/sweeps", content=b"{not json", headers={"content-type": "application/json"}
        ),
        422,
    )
    assert body["errors"]
    assert_problem(client.post("/api/v1/sweeps", json=[1, 2]), 422)


def test_unknown_ids_are_404(client: TestClient) -> None:
    for path in ("/api/v1/sweeps/999", "/api/v1/runs/999", "/api/v1/runs/999/metrics"):
        assert_problem(client.get(path), 404)
    assert_problem(client.post("/api/v1/runs/999/cancel"), 404)
    assert_problem(client.get("/api/v1/nothing-here"), 404)


def test_bad_query_parameters(client: TestClient) -> None:
    run_id = client.post("/api/v1/sweeps", json=QUICK).json()["run_ids"][0]
    assert "limit" in fields(assert_problem(client.get("/api/v1/runs?limit=0"), 422))
    assert "status" in fields(assert_problem(client.get("/api/v1/runs?status=bogus"), 422))
    assert "cursor" in fields(
        assert_problem(client.get(f"/api/v1/runs/{run_id}/metrics?cursor=garbage"), 422)
    )
    assert "end" in fields(
        assert_problem(client.get(f"/api/v1/runs/{run_id}/metrics?start=5&end=2"), 422)
    )
    assert_problem(client.get("/api/v1/runs/abc"), 422)


def test_oversized_body_is_413(client: TestClient) -> None:
    huge = QUICK | {"name": "x" * 100, "runs": [{"seed": i} for i in range(600_000)]}
    assert_problem(client.post("/api/v1/sweeps", json=huge), 413)


def test_health_and_openapi(client: TestClient, db_url: str) -> None:
    assert client.get("/livez").json() == {"status": "ok"}
    # No dispatcher has led: queued runs would not start.
    assert "no dispatcher" in assert_problem(client.get("/readyz"), 503)["detail"]
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        db.add(DispatcherRecord(id="d", host="h", pid=1, leader=True))
    with session_scope(make_sessionmaker(engine)) as db:  # a leader that went silent
        stale = utcnow() - timedelta(seconds=30)
        db.execute(update(DispatcherRecord).values(heartbeat_at=stale))
    assert client.get("/readyz").status_code == 503
    with session_scope(make_sessionmaker(engine)) as db:
        db.execute(update(DispatcherRecord).values(heartbeat_at=utcnow()))
    engine.dispose()
    ready = client.get("/readyz").json()
    assert ready["database"] == "ok" and ready["dispatcher"] == "ok"
    spec = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/sweeps" in spec["paths"] and "/api/v1/runs/{run_id}/metrics" in spec["paths"]
