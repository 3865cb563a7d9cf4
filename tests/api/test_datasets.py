"""Datasets over REST on SQLite and PostgreSQL: JSON and .npz uploads, validation (shapes,
lengths, finiteness, caps), the near-parallel report, list/get/download, the loader, and delete
refused while a queued or running run uses the dataset."""

from __future__ import annotations

import hashlib
import io
import zipfile
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from services import datasets as dataset_service
from services.db import make_engine, make_sessionmaker, session_scope
from tests.conftest import make_settings

V1 = "/api/v1"


def problem(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()  # type: ignore[no-any-return]


def npz(**arrays: Any) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def upload_npz(client: TestClient, data: bytes, name: str = "upload") -> Any:
    return client.post(
        f"{V1}/datasets",
        params={"name": name},
        content=data,
        headers={"content-type": "application/x-npz"},
    )


def count(client: TestClient) -> int:
    return client.get(f"{V1}/datasets").json()["count"]  # type: ignore[no-any-return]


def test_json_upload_round_trips_and_reports_near_parallel_rows(client: TestClient, db_url) -> None:  # type: ignore[no-untyped-def]
    X = [[1.0, 0.0], [0.0, 2.0], [3.0, 3e-7], [0.0, 0.0], [-1.0, 1.0]]
    y = [1, -1, 0.5, 2, 3]
    created = client.post(f"{V1}/datasets", json={"name": "tiny", "X": X, "y": y})
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["n"], body["d"], body["label_dim"], body["size_bytes"]) == (5, 2, 0, 120)
    Xa, ya = np.array(X, dtype=np.float64), np.array(y, dtype=np.float64)
    assert body["checksum"] == hashlib.sha256(Xa.tobytes() + ya.tobytes()).hexdigest()
    report = body["report"]
    assert report["near_parallel_pairs"] == 1 and report["near_parallel_examples"][0][:2] == [0, 2]
    assert report["zero_rows"] == [3] and report["max_abs_cos_pair"] == [0, 2]
    assert client.get(f"{V1}/datasets/{body['id']}").json() == body

    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        X2, y2 = dataset_service.load_arrays(db_session=db, dataset_id=body["id"])
    engine.dispose()
    assert X2.dtype == np.float64 and X2.shape == (5, 2) and y2.shape == (5,)
    assert np.array_equal(X2, Xa) and np.array_equal(y2, ya) and X2.flags.writeable

    download = client.get(f"{V1}/datasets/{body['id']}/arrays")
    with np.load(io.BytesIO(download.content)) as arrays:
        assert np.array_equal(arrays["X"], Xa) and np.array_equal(arrays["y"], ya)


def test_npz_upload_with_matrix_labels(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(50, 3)), rng.normal(size=(50, 2)).astype(np.float32)
    created = upload_npz(client, npz(X=X, y=y), "npz")
    assert created.status_code == 201, created.text
    body = created.json()
    assert (body["name"], body["n"], body["d"], body["label_dim"]) == ("npz", 50, 3, 2)
    assert body["report"]["near_parallel_pairs"] == 0


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "x", "X": [[1.0, 2.0], [3.0]], "y": [1, 2]}, "X[1]"),
        ({"name": "x", "X": [[1.0], [2.0]], "y": [1]}, "y"),
        ({"name": "x", "X": [[1.0], [2.0]], "y": [[1, 2], [3]]}, "y[1]"),
        ({"name": "x", "X": [], "y": []}, "X"),
        ({"name": "x", "X": [[]], "y": [1]}, "X[0]"),
        ({"name": "x", "X": [[1.0], ["a"]], "y": [1, 2]}, "X[1][0]"),
        ({"name": "x", "X": [[1.0], [True]], "y": [1, 2]}, "X[1][0]"),
        ({"name": "", "X": [[1.0]], "y": [1]}, "name"),
        ({"X": [[1.0]], "y": [1]}, "name"),
        ({"name": "x", "X": [[1.0]], "y": [1], "extra": 1}, "extra"),
    ],
)
def test_bad_json_datasets_get_422_naming_the_field_and_store_nothing(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    before = count(client)
    errors = problem(client.post(f"{V1}/datasets", json=body), 422)["errors"]
    assert field in {e["field"] for e in errors}, errors
    assert count(client) == before


def test_non_finite_values_are_refused_with_their_index(client: TestClient) -> None:
    before = count(client)
    content = b'{"name": "x", "X": [[1.0, 2.0], [3.0, NaN]], "y": [1, Infinity]}'
    response = client.post(
        f"{V1}/datasets", content=content, headers={"content-type": "application/json"}
    )
    fields = {e["field"] for e in problem(response, 422)["errors"]}
    assert fields == {"X[1][1]", "y[1]"}
    X = np.ones((4, 2))
    X[2, 0] = np.inf
    errors = problem(upload_npz(client, npz(X=X, y=np.ones(4))), 422)["errors"]
    assert errors[0]["field"] == "X[2][0]"
    assert count(client) == before


@pytest.mark.parametrize(
    ("arrays", "field"),
    [
        ({"X": np.ones(4), "y": np.ones(4)}, "X"),
        ({"X": np.ones((4, 2)), "y": np.ones((4, 2, 2))}, "y"),
        ({"X": np.ones((4, 2)), "y": np.ones(3)}, "y"),
        ({"X": np.ones((4, 2))}, "y"),
        ({"X": np.array([["a", "b"]]), "y": np.ones(1)}, "X"),
    ],
)
def test_bad_npz_arrays_are_refused(client: TestClient, arrays: dict[str, Any], field: str) -> None:
    before = count(client)
    errors = problem(upload_npz(client, npz(**arrays)), 422)["errors"]
    assert field in {e["field"] for e in errors}, errors
    problem(upload_npz(client, b"not a zip file"), 422)
    problem(
        client.post(
            f"{V1}/datasets",
            content=npz(X=np.ones((2, 2)), y=np.ones(2)),
            headers={"content-type": "application/x-npz"},
        ),
        422,
    )  # no ?name=
    assert count(client) == before


def test_oversize_uploads_get_413(client: TestClient, db_url: str) -> None:
    before = count(client)
    settings = make_settings(db_url, max_dataset_bytes=1000, max_n=10_000)
    with TestClient(create_app(settings)) as small:
        X = np.ones((100, 2))  # 1,600 bytes of float64
        problem(upload_npz(small, npz(X=X, y=np.ones(100))), 413)
        problem(
            small.post(f"{V1}/datasets", json={"name": "x", "X": X.tolist(), "y": [1] * 100}), 413
        )
        # a zip bomb: tiny compressed, huge declared: refused before it is unpacked
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("X.npy", b"\0" * 10_000_000)
        problem(upload_npz(small, buffer.getvalue()), 413)
    with TestClient(create_app(make_settings(db_url, max_request_bytes=10_000))) as tiny:
        problem(upload_npz(tiny, npz(X=np.ones((1000, 2)), y=np.ones(1000))), 413)
    with TestClient(create_app(make_settings(db_url, max_n=3))) as few:
        body = problem(
            few.post(f"{V1}/datasets", json={"name": "x", "X": [[1]] * 4, "y": [1] * 4}), 422
        )
        assert body["errors"][0]["field"] == "X"
    assert count(client) == before


def test_delete_is_refused_while_a_queued_or_running_run_uses_it(client: TestClient) -> None:
    dataset_id = client.post(f"{V1}/datasets", json={"name": "d", "X": [[1.0]], "y": [1]}).json()[
        "id"
    ]
    other = client.post(f"{V1}/datasets", json={"name": "e", "X": [[1.0]], "y": [1]}).json()["id"]
    config = {"data": {"kind": "dataset", "dataset_id": dataset_id}}
    run = client.post(f"{V1}/runs", json={"config": config, "external": True}).json()
    body = problem(client.delete(f"{V1}/datasets/{dataset_id}"), 409)
    assert str(run["id"]) in body["detail"]
    assert client.delete(f"{V1}/datasets/{other}").status_code == 204
    finished = client.post(f"{V1}/runs/{run['id']}/finish", json={"status": "succeeded"})
    assert finished.status_code == 200
    assert client.delete(f"{V1}/datasets/{dataset_id}").status_code == 204
    problem(client.get(f"{V1}/datasets/{dataset_id}"), 404)
    problem(client.delete(f"{V1}/datasets/{dataset_id}"), 404)


def test_near_parallel_report_matches_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    X = rng.normal(size=(2500, 5))
    X[2100] = -3 * X[7]
    X[1500] = X[1499] * (1 + 1e-12)
    report = dataset_service.near_parallel_report(X, block=512)
    unit = X / np.linalg.norm(X, axis=1, keepdims=True)
    cos = np.abs(unit @ unit.T)
    upper = np.triu(cos, k=1)
    assert report["near_parallel_pairs"] == int((upper >= dataset_service.NEAR_PARALLEL_COS).sum())
    assert report["near_parallel_pairs"] == 2
    assert sorted(tuple(p[:2]) for p in report["near_parallel_examples"]) == [
        (7, 2100),
        (1499, 1500),
    ]
    assert report["max_abs_cos"] == pytest.approx(upper.max())
    i, j = np.triu_indices(len(X), k=1)  # δ: every pair's difference of unit rows
    distances = np.linalg.norm(unit[i] - unit[j], axis=1)
    assert report["min_separation"] == pytest.approx(float(distances.min()), abs=1e-15)
    assert sorted(report["min_separation_pair"]) == [1499, 1500]


def test_upload_report_and_run_count_the_same_near_parallel_pairs() -> None:
    """One threshold for the upload's pre-flight and the run's data/parallel_pairs: a pair with
    1 − cos = 1e-7 is near-parallel for both (the run once used 1e-9, the upload 1e-6), and
    |cos| that rounds above 1 is reported as 1."""
    from worker.config import DataConfig, RunConfig
    from worker.data import make_dataset
    from worker.separation import unit_rows

    rng = np.random.default_rng(2)
    X = rng.normal(size=(40, 5))
    X[30] = X[3] + np.sqrt(2e-7) * np.linalg.norm(X[3]) * np.eye(5)[0] * 0.999
    cos = X[3] @ X[30] / (np.linalg.norm(X[3]) * np.linalg.norm(X[30]))
    assert 1e-9 < 1 - cos < 1e-6
    X[7] = [-2.3250307746388343, -0.21879166393254573, -1.2459109472530652,
            -0.7322673547034516, -0.5442589828573099]  # fmt: skip
    X[31] = 5.4604660804660075 * X[7]  # their cosine rounds to 1 + 2⁻⁵² without the clamp
    unit = unit_rows(X)
    assert float(unit[7] @ unit[31]) > 1.0
    report = dataset_service.near_parallel_report(X)
    cfg = RunConfig(data=DataConfig(kind="dataset", dataset_id=1, n=40, d=5))
    run = make_dataset(cfg, (X, np.zeros(40))).separation
    assert report["near_parallel_pairs"] == run.parallel_pairs == 2
    assert report["max_abs_cos"] <= 1.0 and run.max_abs_cosine <= 1.0
    assert report["max_abs_cos"] == pytest.approx(run.max_abs_cosine, abs=1e-15)
    assert report["min_separation"] == pytest.approx(run.min_separation, abs=1e-15)
