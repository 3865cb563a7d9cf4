"""Idempotency keys on the creating POSTs, on SQLite and PostgreSQL: a retried request gets the
first answer again and nothing is created twice, also when the retries race; another body with
the same key is a 422; keys expire."""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from api.main import create_app
from services.db import make_engine, make_sessionmaker, session_scope
from services.models import Dataset, IdempotencyKey, Run, Sweep, utcnow
from tests.analysis.synthetic import live_server
from tests.conftest import make_settings

V1 = "/api/v1"
SPEC = {"base": {"data": {"n": 8, "d": 4}, "steps": 5}, "grid": {"seed": [0, 1]}}
CREATES: dict[str, tuple[str, dict[str, Any], dict[str, Any], Any]] = {
    # route: (path, body, another body, table counted)
    "sweeps": ("/sweeps", SPEC, SPEC | {"name": "other"}, Sweep),
    "runs": ("/runs", {"config": {"lr": 1}, "external": True}, {"config": {"lr": 2}}, Run),
    "datasets": (
        "/datasets",
        {"name": "d", "X": [[1.0, 0.0]], "y": [1.0]},
        {"name": "d", "X": [[0.0, 1.0]], "y": [1.0]},
        Dataset,
    ),
}


def count(db_url: str, table: Any) -> int:
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        n = db.scalar(select(func.count()).select_from(table))
    engine.dispose()
    return int(n or 0)


@pytest.mark.parametrize("route", sorted(CREATES))
def test_a_retried_request_gets_the_first_answer_and_creates_nothing_more(
    client: TestClient, db_url: str, route: str
) -> None:
    path, body, other, table = CREATES[route]
    before = count(db_url, table)
    key = {"Idempotency-Key": f"retry-{route}"}
    first = client.post(V1 + path, json=body, headers=key)
    assert first.status_code == 201, first.text
    again = client.post(V1 + path, json=body, headers=key)
    assert (again.status_code, again.json()) == (201, first.json())
    assert again.headers["idempotent-replayed"] == "true"
    created = 2 if route == "sweeps" else 1  # a sweep's two runs are counted in Run, not Sweep
    assert count(db_url, table) == before + (1 if table is not Run else created)
    clash = client.post(V1 + path, json=other, headers=key)
    assert clash.status_code == 422 and clash.json()["errors"][0]["field"] == "Idempotency-Key"
    unkeyed = [client.post(V1 + path, json=body).status_code for _ in range(2)]
    assert unkeyed == [201, 201], "without a key every request creates"


def test_keys_expire(client: TestClient, db_url: str) -> None:
    key = {"Idempotency-Key": "old"}
    first = client.post(f"{V1}/sweeps", json=SPEC, headers=key).json()
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        db.execute(update(IdempotencyKey).values(created_at=utcnow() - timedelta(days=2)))
    engine.dispose()
    second = client.post(f"{V1}/sweeps", json=SPEC, headers=key).json()
    assert second["id"] != first["id"], "an expired key is a new request"


def test_racing_retries_create_one_sweep(db_url: str) -> None:
    """Twelve clients send the same key at once (a client retrying over several connections)."""
    app = create_app(make_settings(db_url))
    answers: list[tuple[int, Any]] = []
    with live_server(app) as url:

        def post(_: int) -> None:
            response = httpx.post(
                f"{url}{V1}/sweeps", json=SPEC, headers={"Idempotency-Key": "race"}, timeout=30
            )
            answers.append((response.status_code, response.json()))

        run_all([lambda i=i: post(i) for i in range(12)])
    assert {status for status, _ in answers} == {201}
    assert len({body["id"] for _, body in answers}) == 1
    assert count(db_url, Sweep) == 1


def run_all(calls: list[Callable[[], None]]) -> None:
    threads = [threading.Thread(target=call) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
