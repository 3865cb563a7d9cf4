"""External runs over REST on SQLite and PostgreSQL: create, log batches, finish; re-sent and
concurrent batches are stored once; bad batches get problem+json and change nothing."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from fastapi.testclient import TestClient

V1 = "/api/v1"


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert body["status"] == status and body["detail"]
    return body  # type: ignore[no-any-return]


def external_run(client: TestClient, config: dict[str, Any] | None = None) -> int:
    created = client.post(f"{V1}/runs", json={"config": config or {"lr": 0.1}, "external": True})
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["status"] == "running" and body["external"] is True
    return body["id"]  # type: ignore[no-any-return]


def every_point(client: TestClient, run_id: int) -> list[tuple[str, int, Any]]:
    page = client.get(f"{V1}/runs/{run_id}/metrics", params={"limit": 100_000}).json()
    assert page["next_cursor"] is None
    return [(p["metric"], p["step"], p["value"]) for p in page["data"]]


def test_a_script_logs_like_it_would_to_mlflow(client: TestClient) -> None:
    run_id = external_run(client, {"hidden": [64, 64], "optimizer": {"name": "adam"}})
    run = client.get(f"{V1}/runs/{run_id}").json()
    assert run["config"] == {"hidden": [64, 64], "optimizer": {"name": "adam"}}
    batch = [{"metric": "train/loss", "step": s, "value": 1 / (s + 1)} for s in range(500)]
    batch += [{"metric": "eval.acc", "step": s, "value": 0.5} for s in range(0, 500, 100)]
    batch += [
        {"metric": "grad-norm", "step": 0, "value": "NaN"},
        {"metric": "grad-norm", "step": 1, "value": "Infinity"},
        {"metric": "grad-norm", "step": 2, "value": "-Infinity"},
        {"metric": "grad-norm", "step": 3, "value": 7},
    ]
    logged = client.post(f"{V1}/runs/{run_id}/metrics", json={"points": batch})
    assert logged.json() == {"received": 509, "stored": 509}
    again = client.post(f"{V1}/runs/{run_id}/metrics", json={"points": batch[:100]})
    assert again.json() == {"received": 100, "stored": 0}
    points = every_point(client, run_id)
    assert len(points) == 509
    assert [v for n, _, v in points if n == "grad-norm"] == ["NaN", "Infinity", "-Infinity", 7.0]
    finished = client.post(  # Python's json writes NaN as a bare literal: accepted too
        f"{V1}/runs/{run_id}/finish",
        content=b'{"status": "succeeded", "summary": {"best": 0.9, "bad": NaN}}',
        headers={"content-type": "application/json"},
    )
    assert finished.status_code == 200, finished.text
    body = finished.json()
    assert body["status"] == "succeeded" and body["finished_at"]
    assert body["summary"] == {"best": 0.9, "bad": "NaN"}
    late = client.post(f"{V1}/runs/{run_id}/metrics", json={"points": batch[:1]})
    assert "succeeded" in problem(late, 409)["detail"]
    problem(client.post(f"{V1}/runs/{run_id}/finish", json={"status": "failed"}), 409)
    assert len(every_point(client, run_id)) == 509


def test_cluster_runs_and_unknown_runs_refuse_metric_posts(client: TestClient) -> None:
    spec = {"base": {"data": {"n": 8, "d": 4}, "steps": 5}}
    queued = client.post(f"{V1}/sweeps", json=spec).json()["run_ids"][0]
    point = {"points": [{"metric": "loss", "step": 0, "value": 1.0}]}
    assert (
        "dispatcher"
        in problem(client.post(f"{V1}/runs/{queued}/metrics", json=point), 409)["detail"]
    )
    problem(client.post(f"{V1}/runs/{queued}/finish", json={"status": "succeeded"}), 409)
    problem(client.post(f"{V1}/runs/999999/metrics", json=point), 404)
    past = problem(client.post(f"{V1}/runs/99999999999/metrics", json=point), 422)  # 32 bits
    assert past["errors"][0]["field"] == "run_id"
    problem(client.post(f"{V1}/runs/999999/finish", json={"status": "succeeded"}), 404)


def test_a_queued_run_is_validated_like_a_sweep(client: TestClient) -> None:
    created = client.post(f"{V1}/runs", json={"config": {"width": 32, "data": {"n": 8, "d": 4}}})
    assert created.status_code == 201, created.text
    run = created.json()
    assert run["status"] == "queued" and run["external"] is False and run["sweep_id"]
    assert run["config"]["width"] == 32
    bad = problem(client.post(f"{V1}/runs", json={"config": {"width": -1}}), 422)
    assert [e["field"] for e in bad["errors"]] == ["config.width"]
    big = problem(
        client.post(f"{V1}/runs", json={"config": {"x": "y" * 70_000}, "external": True}), 422
    )
    assert big["errors"][0]["field"] == "config"


@pytest.mark.parametrize(
    ("points", "field"),
    [
        ([{"metric": "bad name!", "step": 0, "value": 1.0}], "points[1].metric"),
        ([{"metric": "loss", "step": -1, "value": 1.0}], "points[1].step"),
        ([{"metric": "loss", "step": 1.5, "value": 1.0}], "points[1].step"),
        ([{"metric": "loss", "step": "3", "value": 1.0}], "points[1].step"),
        ([{"metric": "loss", "step": 2**63, "value": 1.0}], "points[1].step"),
        ([{"metric": "loss", "step": 0, "value": "nan"}], "points[1].value"),
        ([{"metric": "loss", "step": 0, "value": True}], "points[1].value"),
        ([{"metric": "loss", "step": 0}], "points[1].value"),
        ([{"metric": "loss", "step": 0, "value": 1.0, "wall": 3}], "points[1].wall"),
        ([{"metric": "x" * 129, "step": 0, "value": 1.0}], "points[1].metric"),
    ],
)
def test_malformed_batches_get_422_naming_the_point_and_store_nothing(
    client: TestClient, points: list[dict[str, Any]], field: str
) -> None:
    run_id = external_run(client)
    good = {"metric": "ok", "step": 0, "value": 1.0}
    body = problem(
        client.post(f"{V1}/runs/{run_id}/metrics", json={"points": [good, *points]}), 422
    )
    assert field in {e["field"] for e in body["errors"]}, body["errors"]
    assert every_point(client, run_id) == []


def test_empty_oversize_and_non_json_batches_are_refused(client: TestClient, db_url: str) -> None:
    run_id = external_run(client)
    url = f"{V1}/runs/{run_id}/metrics"
    problem(client.post(url, json={"points": []}), 422)
    problem(client.post(url, json={"metrics": []}), 422)
    problem(
        client.post(url, content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    from api.main import create_app
    from tests.conftest import make_settings

    with TestClient(create_app(make_settings(db_url, max_batch_points=10))) as small:
        points = [{"metric": "m", "step": s, "value": 0.0} for s in range(11)]
        body = problem(small.post(url, json={"points": points}), 422)
        assert "OVERPARAM_MAX_BATCH_POINTS" in body["detail"]
    with TestClient(create_app(make_settings(db_url, max_request_bytes=1000))) as tiny:
        points = [{"metric": "m", "step": s, "value": 0.0} for s in range(100)]
        problem(tiny.post(url, json={"points": points}), 413)
    assert every_point(client, run_id) == []


def test_concurrent_overlapping_posts_store_every_point_exactly_once(client: TestClient) -> None:
    run_id = external_run(client)
    points = [{"metric": m, "step": s, "value": s / 7} for m in ("a", "b") for s in range(2000)]
    statuses: list[int] = []

    def post(offset: int) -> None:
        for start in range(offset, len(points), 700):
            response = client.post(
                f"{V1}/runs/{run_id}/metrics", json={"points": points[start : start + 1000]}
            )
            statuses.append(response.status_code)

    threads = [threading.Thread(target=post, args=(offset,)) for offset in (0, 150, 300, 450)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert set(statuses) == {200}
    stored = every_point(client, run_id)
    assert len(stored) == len(points) == len({(m, s) for m, s, _ in stored})


def test_series_batches_store_like_points_and_merge_a_repeated_metric(client: TestClient) -> None:
    run_id = external_run(client)
    series = [
        {"metric": "loss", "steps": [0, 1, 2], "values": [1.0, "NaN", "Infinity"]},
        {"metric": "acc", "steps": [5], "values": [0.25]},
        {"metric": "loss", "steps": [2, 3], "values": [-1.0, "-Infinity"]},  # step 2: first wins
    ]
    logged = client.post(f"{V1}/runs/{run_id}/metrics", json={"series": series})
    assert logged.json() == {"received": 6, "stored": 5}
    again = client.post(f"{V1}/runs/{run_id}/metrics", json={"series": series[:1]})
    assert again.json() == {"received": 3, "stored": 0}
    assert every_point(client, run_id) == [
        ("acc", 5, 0.25),
        ("loss", 0, 1.0),
        ("loss", 1, "NaN"),
        ("loss", 2, "Infinity"),
        ("loss", 3, "-Infinity"),
    ]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"series": [{"metric": "a", "steps": [0, 1], "values": [1.0]}]}, "series[0].values"),
        ({"series": [{"metric": "a", "steps": [0, -1], "values": [1, 2]}]}, "series[0].steps[1]"),
        ({"series": [{"metric": "a", "steps": [0, True], "values": [1, 2]}]}, "series[0].steps[1]"),
        ({"series": [{"metric": "a", "steps": [0], "values": ["nan"]}]}, "series[0].values[0]"),
        ({"series": [{"metric": "a", "steps": [0], "values": [None]}]}, "series[0].values[0]"),
        ({"series": [{"metric": "a b", "steps": [0], "values": [1]}]}, "series[0].metric"),
        ({"series": [{"metric": "a", "steps": [], "values": []}]}, "series[0].steps"),
        ({"series": []}, "series"),
        ({"series": [{"metric": "a", "steps": [0], "values": [1]}], "points": []}, "points"),
        ({}, "points"),
    ],
)
def test_malformed_series_batches_get_422_naming_the_field_and_store_nothing(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    run_id = external_run(client)
    response = problem(client.post(f"{V1}/runs/{run_id}/metrics", json=body), 422)
    assert field in {e["field"] for e in response["errors"]}, response["errors"]
    assert every_point(client, run_id) == []


def test_an_unexpected_failure_is_a_500_problem_without_a_trace_and_the_next_post_works(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The ingestion fast path answers errors like every route: problem+json, no traceback."""
    import api.routes.metrics as routes

    run_id = external_run(client)
    real = routes.log_batch

    def broken(**_: Any) -> int:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(routes, "log_batch", broken)
    body = {"series": [{"metric": "a", "steps": [0], "values": [1.0]}]}
    failed = problem(client.post(f"{V1}/runs/{run_id}/metrics", json=body), 500)
    assert "secret" not in failed["detail"] and "Traceback" not in str(failed)
    monkeypatch.setattr(routes, "log_batch", real)
    assert client.post(f"{V1}/runs/{run_id}/metrics", json=body).json()["stored"] == 1
