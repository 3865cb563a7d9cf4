"""Every mutating route answers only after its transaction commits.

Against a real uvicorn server on SQLite and PostgreSQL, every commit is slowed down, and the
answer of each mutating route must arrive after the commit ended (FastAPI's default would send
the answer first and commit afterwards). The routes come from the app's own OpenAPI document
(built from its route table), so a route added later fails this test until it is covered here.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import event

from api.main import create_app
from tests.analysis.synthetic import live_server
from tests.conftest import make_settings

V1 = "/api/v1"
SLOW_COMMIT_S = 0.4
MUTATING = {"POST", "PUT", "PATCH", "DELETE"}


class SlowCommits:
    """While armed, each commit of the app's sessions sleeps first; records when commits end."""

    def __init__(self) -> None:
        self.armed = False
        self.ended: list[float] = []
        self.lock = threading.Lock()

    def before(self, _session: Any) -> None:
        if self.armed:
            time.sleep(SLOW_COMMIT_S)

    def after(self, _session: Any) -> None:
        if self.armed:
            with self.lock:
                self.ended.append(time.monotonic())


@pytest.fixture
def served(db_url: str) -> Iterator[tuple[httpx.Client, SlowCommits, Any]]:
    app = create_app(make_settings(db_url))
    commits = SlowCommits()
    with live_server(app) as url, httpx.Client(base_url=url + V1, timeout=30) as http:
        event.listen(app.state.sessions, "before_commit", commits.before)
        event.listen(app.state.sessions, "after_commit", commits.after)
        yield http, commits, app


def requests(http: httpx.Client) -> dict[tuple[str, str], Callable[[], httpx.Response]]:
    """For each mutating route, a request that succeeds; what it needs exists beforehand."""
    spec = {"base": {"data": {"n": 8, "d": 4}, "steps": 5}, "grid": {"seed": [0, 1]}}
    sweep = http.post("/sweeps", json=spec).json()
    external = [http.post("/runs", json={"config": {}, "external": True}).json() for _ in (0, 1)]
    dataset = http.post("/datasets", json={"name": "d", "X": [[1.0, 0.0]], "y": [1.0]}).json()
    batch = {"series": [{"metric": "loss", "steps": [0, 1], "values": [1.0, 0.5]}]}
    carol = http.post("/users", json={"name": "carol"}).json()
    token = http.post("/users/carol/tokens", json={"name": "spare"}).json()
    return {
        ("POST", "/api/v1/users"): lambda: http.post("/users", json={"name": "bob"}),
        ("PATCH", "/api/v1/users/{name}"): lambda: http.patch("/users/carol", json={"share": 2}),
        ("POST", "/api/v1/users/{name}/tokens"): lambda: http.post(
            "/users/carol/tokens", json={"name": "laptop"}
        ),
        ("DELETE", "/api/v1/tokens/{token_id}"): lambda: http.delete(f"/tokens/{token['id']}"),
        ("POST", "/api/v1/session"): lambda: http.post("/session", json={"token": carol["token"]}),
        ("DELETE", "/api/v1/session"): lambda: http.delete("/session"),
        ("POST", "/api/v1/sweeps"): lambda: http.post("/sweeps", json=spec),
        ("POST", "/api/v1/runs"): lambda: http.post("/runs", json={"config": {}, "external": True}),
        ("POST", "/api/v1/runs/{run_id}/cancel"): lambda: http.post(
            f"/runs/{sweep['run_ids'][0]}/cancel"
        ),
        ("POST", "/api/v1/runs/{run_id}/metrics"): lambda: http.post(
            f"/runs/{external[0]['id']}/metrics", json=batch
        ),
        ("POST", "/api/v1/runs/{run_id}/finish"): lambda: http.post(
            f"/runs/{external[1]['id']}/finish", json={"status": "succeeded"}
        ),
        ("POST", "/api/v1/datasets"): lambda: http.post(
            "/datasets", json={"name": "e", "X": [[0.0, 1.0]], "y": [2.0]}
        ),
        ("DELETE", "/api/v1/datasets/{dataset_id}"): lambda: http.delete(
            f"/datasets/{dataset['id']}"
        ),
    }


def test_every_mutating_route_answers_after_its_commit(served) -> None:  # type: ignore[no-untyped-def]
    http, commits, app = served
    routes = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
        if method.upper() in MUTATING
    }
    calls = requests(http)
    assert routes == set(calls), "every mutating route needs a request in this test"
    for key, call in sorted(calls.items()):
        commits.ended.clear()
        commits.armed = True
        start = time.monotonic()
        response = call()
        answered = time.monotonic()
        commits.armed = False
        assert response.status_code < 300, (key, response.text)
        assert commits.ended, f"{key}: no commit"
        assert max(commits.ended) <= answered, f"{key} answered before its commit ended"
        assert answered - start >= SLOW_COMMIT_S, key
