"""A lab's shared service, on SQLite and PostgreSQL, with authentication required.

The route matrix is generated from the app's own OpenAPI document, so a mutating route added
later fails until it is classified here: every one answers 401 without a token, 403 to another
member where it changes someone's object (or is an admin's), and succeeds for the owner and for
an admin. Also: tokens are stored hashed, revocable and shown once; reads are open to every
member; a text/plain body (what a cross-site form sends) and a foreign Host are refused;
quotas and the rate limit refuse without storing anything; the audit trail is admins' only; a
service that requires tokens refuses to start without an admin.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from api.main import create_app
from services.db import make_engine, make_sessionmaker, session_scope
from services.models import ApiToken, MetricChunk, Run, Sweep
from services.users import create_user
from tests.analysis.synthetic import live_server
from tests.conftest import make_settings

V1 = "/api/v1"
SPEC = {"base": {"data": {"n": 8, "d": 4}, "steps": 5}}
BATCH = {"series": [{"metric": "loss", "steps": [0, 1, 2], "values": [1.0, 0.5, 0.25]}]}
DATASET = {"name": "d", "X": [[1.0, 0.0], [0.0, 1.0]], "y": [1.0, -1.0]}


@dataclass
class Lab:
    client: TestClient
    db_url: str
    tokens: dict[str, str]  # admin, alice, bob

    def as_(self, who: str | None) -> dict[str, str]:
        self.client.cookies.clear()  # POST /session leaves one: each call says who it is
        return {} if who is None else {"Authorization": f"Bearer {self.tokens[who]}"}

    def post(self, who: str | None, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(V1 + path, headers=self.as_(who), **kw)

    def count(self, table: Any) -> int:
        engine = make_engine(self.db_url)
        with session_scope(make_sessionmaker(engine)) as db:
            n = db.scalar(select(func.count()).select_from(table)) or 0
        engine.dispose()
        return int(n)


def lab_app(db_url: str, **settings: Any) -> Any:
    lab = make_settings(db_url, **({"auth": "required", "allowed_hosts": ["localhost"]} | settings))
    return create_app(lab)


@pytest.fixture
def lab(db_url: str) -> Iterator[Lab]:
    engine = make_engine(db_url)
    tokens = {}
    with session_scope(make_sessionmaker(engine)) as db:
        for name, role in (("admin", "admin"), ("alice", "member"), ("bob", "member")):
            tokens[name] = create_user(db_session=db, name=name, role=role)[1]
    engine.dispose()
    with TestClient(lab_app(db_url), base_url="http://localhost") as client:
        yield Lab(client, db_url, tokens)


# -- the matrix --------------------------------------------------------------------------------

Act = Callable[[Lab, str | None], httpx.Response]  # (lab, acting user) -> response


def on_alices(
    make: Callable[[Lab], Any], act: Callable[[Lab, str | None, Any], httpx.Response]
) -> Act:
    """An action on an object alice owns, made fresh for each try."""
    return lambda lab, who: act(lab, who, make(lab))


def alices_run(lab: Lab) -> int:
    return int(lab.post("alice", "/runs", json={"config": {}, "external": True}).json()["id"])


def alices_queued_run(lab: Lab) -> int:
    return int(lab.post("alice", "/sweeps", json=SPEC).json()["run_ids"][0])


def alices_dataset(lab: Lab) -> int:
    return int(lab.post("alice", "/datasets", json=DATASET).json()["id"])


def alices_token(lab: Lab) -> int:
    return int(lab.post("alice", "/users/alice/tokens", json={"name": "t"}).json()["id"])


# kind: "create" (any member), "owned" (its owner or an admin), "self" (the user or an admin),
# "admin" (admins only); for "self" and "owned" alice is the owner.
MATRIX: dict[tuple[str, str], tuple[str, Act]] = {
    ("POST", "/api/v1/sweeps"): ("create", lambda lab, who: lab.post(who, "/sweeps", json=SPEC)),
    ("POST", "/api/v1/runs"): (
        "create",
        lambda lab, who: lab.post(who, "/runs", json={"config": {}, "external": True}),
    ),
    ("POST", "/api/v1/datasets"): (
        "create",
        lambda lab, who: lab.post(who, "/datasets", json=DATASET),
    ),
    ("POST", "/api/v1/session"): (
        "create",
        lambda lab, who: lab.post(who, "/session", json={"token": lab.tokens["bob"]}),
    ),
    ("DELETE", "/api/v1/session"): (
        "create",
        lambda lab, who: lab.client.delete(f"{V1}/session", headers=lab.as_(who)),
    ),
    ("POST", "/api/v1/runs/{run_id}/cancel"): (
        "owned",
        on_alices(alices_queued_run, lambda lab, who, run: lab.post(who, f"/runs/{run}/cancel")),
    ),
    ("POST", "/api/v1/runs/{run_id}/metrics"): (
        "owned",
        on_alices(
            alices_run, lambda lab, who, run: lab.post(who, f"/runs/{run}/metrics", json=BATCH)
        ),
    ),
    ("POST", "/api/v1/runs/{run_id}/finish"): (
        "owned",
        on_alices(
            alices_run,
            lambda lab, who, run: lab.post(
                who, f"/runs/{run}/finish", json={"status": "succeeded"}
            ),
        ),
    ),
    ("DELETE", "/api/v1/datasets/{dataset_id}"): (
        "owned",
        on_alices(
            alices_dataset,
            lambda lab, who, d: lab.client.delete(f"{V1}/datasets/{d}", headers=lab.as_(who)),
        ),
    ),
    ("POST", "/api/v1/users/{name}/tokens"): (
        "self",
        lambda lab, who: lab.post(who, "/users/alice/tokens", json={"name": "laptop"}),
    ),
    ("DELETE", "/api/v1/tokens/{token_id}"): (
        "self",
        on_alices(
            alices_token,
            lambda lab, who, t: lab.client.delete(f"{V1}/tokens/{t}", headers=lab.as_(who)),
        ),
    ),
    ("POST", "/api/v1/users"): (
        "admin",
        lambda lab, who: lab.post(who, "/users", json={"name": f"new-{len(lab.tokens)}-{who}"}),
    ),
    ("PATCH", "/api/v1/users/{name}"): (
        "admin",
        lambda lab, who: lab.client.patch(
            f"{V1}/users/alice", json={"share": 2.0}, headers=lab.as_(who)
        ),
    ),
}


def problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    return response.json()  # type: ignore[no-any-return]


def test_every_mutating_route_needs_the_owner_or_an_admin(lab: Lab) -> None:
    routes = {
        (method.upper(), path)
        for path, operations in lab.client.app.openapi()["paths"].items()  # type: ignore[attr-defined]
        for method in operations
        if method.upper() in ("POST", "PUT", "PATCH", "DELETE")
    }
    assert routes == set(MATRIX), "classify every mutating route in MATRIX"
    checks = 0
    for route, (kind, act) in sorted(MATRIX.items()):
        assert problem(act(lab, None), 401)["status"] == 401, route
        allowed = {"create": ("alice", "bob", "admin"), "owned": ("alice", "admin"),
                   "self": ("alice", "admin"), "admin": ("admin",)}[kind]  # fmt: skip
        for who in ("alice", "bob", "admin"):
            response = act(lab, who)
            if who in allowed:
                assert response.status_code < 300, (route, who, response.text)
            else:
                assert "only" in problem(response, 403)["detail"], (route, who)
            checks += 1
    assert checks == 3 * len(MATRIX)


def test_reads_are_open_to_every_member_and_closed_without_a_token(lab: Lab) -> None:
    run = alices_run(lab)
    assert lab.post("alice", f"/runs/{run}/metrics", json=BATCH).status_code == 200
    for who in ("alice", "bob", "admin"):
        page = lab.client.get(f"{V1}/runs/{run}/metrics", headers=lab.as_(who))
        assert page.json()["count"] == 3
    problem(lab.client.get(f"{V1}/runs/{run}/metrics"), 401)
    problem(lab.client.get(f"{V1}/runs", headers={"Authorization": "Bearer ovp_nope"}), 401)
    assert (
        lab.client.get(f"{V1}/runs", params={"owner": "alice"}, headers=lab.as_("bob")).json()[
            "count"
        ]
        == 1
    )


def test_tokens_are_hashed_shown_once_revocable_and_record_their_use(lab: Lab) -> None:
    made = lab.post("alice", "/users/alice/tokens", json={"name": "ci"}).json()
    engine = make_engine(lab.db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        digests = set(db.scalars(select(ApiToken.digest)))
    engine.dispose()
    assert made["token"] not in digests and all(made["token"] not in d for d in digests)
    listed = lab.client.get(f"{V1}/users/alice/tokens", headers=lab.as_("alice")).json()["data"]
    assert all("token" not in t for t in listed), "never shown again"
    fresh = {"Authorization": f"Bearer {made['token']}"}
    assert lab.client.get(f"{V1}/me", headers=fresh).json()["name"] == "alice"
    listed = lab.client.get(f"{V1}/users/alice/tokens", headers=lab.as_("alice")).json()["data"]
    assert next(t for t in listed if t["id"] == made["id"])["last_used_at"]
    revoked = lab.client.delete(f"{V1}/tokens/{made['id']}", headers=lab.as_("alice"))
    assert revoked.status_code == 204
    problem(lab.client.get(f"{V1}/me", headers=fresh), 401)


def test_cross_site_bodies_and_foreign_hosts_are_refused(lab: Lab) -> None:
    run = alices_run(lab)
    plain = {"content-type": "text/plain"} | lab.as_("alice")
    for path, body in ((f"/runs/{run}/metrics", BATCH), ("/sweeps", SPEC), ("/datasets", DATASET)):
        sent = lab.client.post(V1 + path, content=json.dumps(body), headers=plain)
        assert problem(sent, 415)["status"] == 415, path
    assert lab.count(MetricChunk) == 0 and lab.count(Sweep) == 0
    rebinding = lab.client.get(f"{V1}/runs", headers={"host": "evil.example"} | lab.as_("alice"))
    assert "evil.example" in problem(rebinding, 400)["detail"]


@pytest.mark.parametrize("auth", ["off", "required"])
def test_a_page_of_another_site_cannot_cancel_a_run(db_url: str, auth: str) -> None:
    """A bodiless cross-site POST needs no pre-flight: the Origin check refuses it, also on a
    laptop's service without tokens; the dashboard's own (same-site) POST is answered."""
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        token = create_user(db_session=db, name="admin", role="admin")[1]
    engine.dispose()
    app = lab_app(db_url) if auth == "required" else create_app(make_settings(db_url))
    with TestClient(app, base_url="http://localhost") as client:
        client.headers["authorization"] = f"Bearer {token}"
        run = client.post(f"{V1}/runs", json={"config": SPEC["base"]}).json()["id"]
        evil = client.post(f"{V1}/runs/{run}/cancel", headers={"origin": "https://evil.example"})
        assert "evil.example" in problem(evil, 403)["detail"]
        assert client.get(f"{V1}/runs/{run}").json()["status"] == "queued"
        own = client.post(f"{V1}/runs/{run}/cancel", headers={"origin": "http://localhost"})
        assert own.status_code == 200 and own.json()["status"] == "cancelled", own.text


def test_quotas_refuse_with_their_name_limit_and_use_and_store_nothing(lab: Lab) -> None:
    quotas = {"max_active_runs": 1, "max_metric_points": 4, "max_dataset_bytes": 16}
    patched = lab.client.patch(
        f"{V1}/users/alice", json={"quotas": quotas}, headers=lab.as_("admin")
    )
    assert patched.status_code == 200, patched.text
    run = alices_run(lab)  # uses the one active run
    refused = problem(lab.post("alice", "/sweeps", json=SPEC), 403)
    assert (refused["quota"], refused["limit"], refused["used"]) == ("max_active_runs", 1, 1)
    assert lab.count(Sweep) == 0
    assert lab.post("alice", f"/runs/{run}/metrics", json=BATCH).status_code == 200
    refused = problem(lab.post("alice", f"/runs/{run}/metrics", json=BATCH | {"series": [
        {"metric": "acc", "steps": [0, 1], "values": [0.1, 0.2]}]}), 403)  # fmt: skip
    assert (refused["quota"], refused["used"]) == ("max_metric_points", 3)
    assert lab.count(MetricChunk) == 1
    refused = problem(lab.post("alice", "/datasets", json=DATASET), 403)
    assert refused["quota"] == "max_dataset_bytes"
    me = lab.client.get(f"{V1}/me", headers=lab.as_("alice")).json()
    assert me["limits"]["max_active_runs"] == 1 and me["usage"]["max_metric_points"] == 3


def test_the_rate_limit_answers_429_and_stores_nothing(db_url: str) -> None:
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        create_user(db_session=db, name="root", role="admin")
        token = create_user(db_session=db, name="carol", role="member")[1]
    engine.dispose()
    app = lab_app(db_url, rate_limit="3/minute")
    with TestClient(app, base_url="http://localhost") as client:
        auth = {"Authorization": f"Bearer {token}"}
        answers = [client.post(f"{V1}/sweeps", json=SPEC, headers=auth) for _ in range(5)]
    assert [a.status_code for a in answers] == [201, 201, 201, 429, 429]
    assert int(answers[-1].headers["retry-after"]) >= 1
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        assert db.scalar(select(func.count()).select_from(Sweep)) == 3
    engine.dispose()


def test_the_audit_trail_says_who_did_what_and_is_for_admins(lab: Lab) -> None:
    run = alices_queued_run(lab)
    lab.post("admin", f"/runs/{run}/cancel")
    trail = lab.client.get(f"{V1}/audit", headers=lab.as_("admin")).json()["data"]
    actions = [(e["action"], e["target"]) for e in trail]
    assert ("cancel_run", f"run:{run}") in actions and actions[0][0] == "cancel_run"
    problem(lab.client.get(f"{V1}/audit", headers=lab.as_("alice")), 403)


def test_a_service_that_requires_tokens_refuses_to_start_without_an_admin(db_url: str) -> None:
    app = lab_app(db_url)
    with pytest.raises(RuntimeError, match="overparam admin create-user"), TestClient(app):
        pass


def test_runs_are_owned_and_filtered_by_owner(lab: Lab) -> None:
    alices_queued_run(lab)
    lab.post("bob", "/sweeps", json=SPEC)
    engine = make_engine(lab.db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        owners = sorted(db.scalars(select(Run.owner_id)))
    engine.dispose()
    assert len(set(owners)) == 2
    listed = lab.client.get(f"{V1}/runs", headers=lab.as_("bob")).json()["data"]
    assert {r["owner"] for r in listed} == {"alice", "bob"}
    for path in ("/runs", "/sweeps"):
        mine = lab.client.get(f"{V1}{path}?owner=bob", headers=lab.as_("alice")).json()
        assert mine["count"] >= 1 and {r["owner"] for r in mine["data"]} == {"bob"}, path
        nobody = lab.client.get(f"{V1}{path}?owner=carol", headers=lab.as_("alice")).json()
        assert nobody == {"data": [], "count": 0}, path


def test_an_idempotency_key_is_each_users_own(lab: Lab) -> None:
    """The same key from two users is two requests: neither gets the other's answer."""
    key = {"idempotency-key": "nightly-1"}
    alice = lab.client.post(f"{V1}/sweeps", json=SPEC, headers=lab.as_("alice") | key)
    again = lab.client.post(f"{V1}/sweeps", json=SPEC, headers=lab.as_("alice") | key)
    bob = lab.client.post(f"{V1}/sweeps", json=SPEC, headers=lab.as_("bob") | key)
    assert alice.status_code == bob.status_code == 201, (alice.text, bob.text)
    assert again.headers.get("idempotent-replayed") == "true" and again.json() == alice.json()
    assert bob.json()["id"] != alice.json()["id"] and "idempotent-replayed" not in bob.headers
    assert lab.count(Sweep) == 2


def test_signed_in_requests_never_wait_on_each_other_for_threads_and_connections(
    db_url: str,
) -> None:
    """More signed-in requests at once than threads and pooled connections (2 of each): a
    request waiting for a thread for its route holds no connection and no lock of its sign-in,
    so none waits on another that waits on it (a 500 after the pool's 30 s timeout, or a hang on
    the token row, if it did)."""
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        create_user(db_session=db, name="admin", role="admin")
        token = create_user(db_session=db, name="alice", role="member")[1]
    engine.dispose()
    app = lab_app(
        db_url, allowed_hosts=["127.0.0.1"], api_threads=2, db_pool_size=2, db_max_overflow=0
    )
    answers: list[int] = []

    def submit(index: int) -> None:
        spec = SPEC | {"name": f"s{index}"}
        with httpx.Client(base_url=url + V1, timeout=60) as http:
            response = http.post("/sweeps", json=spec, headers={"Authorization": f"Bearer {token}"})
            answers.append(response.status_code)

    with live_server(app) as url:
        threads = [threading.Thread(target=submit, args=(i,)) for i in range(16)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        listed = httpx.get(
            f"{url}{V1}/sweeps", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
    assert sorted(answers) == [201] * 16
    assert sorted(s["name"] for s in listed.json()["data"]) == sorted(f"s{i}" for i in range(16))
