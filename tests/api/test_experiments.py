"""External runs keep a name, params, tags and their script's source; experiments group them
into a sweep of kind "experiment" that lists, analyses and plots like any sweep. On SQLite and
PostgreSQL (the ``client`` fixture's ``db_url``)."""

from __future__ import annotations

import threading
from typing import Any

from fastapi.testclient import TestClient

from api.main import create_app
from tests.analysis.synthetic import live_server
from tests.api import test_auth
from tests.api.test_api import assert_problem
from tests.api.test_auth import Lab
from tests.conftest import make_settings

V1 = "/api/v1"
lab = test_auth.lab  # the fixture: admin, alice and bob with tokens, authentication required
SOURCE = {"script": "/home/a/train.py", "git_commit": "0" * 40, "python": "3.11.9"}


def external(client: TestClient, **fields: Any) -> dict[str, Any]:
    response = client.post(f"{V1}/runs", json={"config": {}, "external": True} | fields)
    assert response.status_code == 201, response.text
    return response.json()  # type: ignore[no-any-return]


def test_an_external_run_keeps_its_name_tags_params_and_source(client: TestClient) -> None:
    params = {"lr": 0.1, "opt": {"momentum": 0.9}, "layers": [8, 8]}
    run = external(
        client, name="mlp-ntk", config=params, tags={"team": "theory", "ds": "xor"}, source=SOURCE
    )
    again = client.get(f"{V1}/runs/{run['id']}").json()
    for got in (run, again):
        assert got["name"] == "mlp-ntk" and got["tags"] == {"team": "theory", "ds": "xor"}
        assert got["config"] == params
        assert got["overrides"] == {"lr": 0.1, "opt.momentum": 0.9}  # scalar params, dotted
        assert got["manifest"]["client"] == SOURCE
        assert got["sweep_id"] is None
    listed = client.get(f"{V1}/runs", params={"limit": 10}).json()["data"]
    assert [(r["name"], r["tags"]["team"]) for r in listed] == [("mlp-ntk", "theory")]
    assert "client" not in external(client)["manifest"]  # no source sent, none stored


def test_bad_tags_experiments_and_sources_are_4xx_naming_the_field(client: TestClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tags": {f"k{i}": "v" for i in range(33)}}, "tags"),
        ({"tags": {"bad key": "v"}}, "tags"),
        ({"tags": {"": "v"}}, "tags"),
        ({"tags": {"k": "v" * 257}}, "tags"),
        ({"tags": {"k": 3}}, "tags"),
        ({"tags": {"k": "a\x00b"}}, "tags"),
        ({"experiment": ""}, "experiment"),
        ({"experiment": "e" * 201}, "experiment"),
        ({"source": "not an object"}, "source"),
        ({"source": {"blob": "x" * 70_000}}, "source"),
        ({"external": False, "experiment": "e"}, "experiment"),
    ]
    for fields, field in cases:
        body = {"config": {}, "external": True} | fields
        problem = assert_problem(client.post(f"{V1}/runs", json=body), 422)
        named = [e["field"] for e in problem.get("errors", [])]
        assert any(name.startswith(field) for name in named), (fields, problem)
    assert client.get(f"{V1}/runs").json()["count"] == 0
    assert client.get(f"{V1}/sweeps").json()["count"] == 0


def test_an_experiment_is_a_sweep_its_external_runs_join(client: TestClient) -> None:
    runs = []
    for width, seed in [(16, 0), (16, 1), (64, 0), (64, 1)]:
        run = external(
            client, name=f"w{width}", config={"width": width, "seed": seed}, experiment="widths"
        )
        steps = list(range(0, 50))
        loss = [float((1 - 0.02 * (1 + width / 64)) ** (2 * s)) for s in steps]
        series = [{"metric": "loss", "steps": steps, "values": loss}]
        assert client.post(f"{V1}/runs/{run['id']}/metrics", json={"series": series}).is_success
        assert client.post(f"{V1}/runs/{run['id']}/finish", json={"status": "succeeded"}).is_success
        runs.append(run)
    other = external(client, config={"width": 8}, experiment="other")
    sweep_id = runs[0]["sweep_id"]
    assert {r["sweep_id"] for r in runs} == {sweep_id} and other["sweep_id"] != sweep_id
    assert [r["index"] for r in runs] == [0, 1, 2, 3] and other["index"] == 0

    sweep = client.get(f"{V1}/sweeps/{sweep_id}").json()
    assert (sweep["name"], sweep["kind"], sweep["run_count"]) == ("widths", "experiment", 4)
    assert sweep["status_counts"] == {"succeeded": 4}
    listed = {s["name"]: s for s in client.get(f"{V1}/sweeps").json()["data"]}
    assert listed["widths"]["kind"] == "experiment" and listed["other"]["run_count"] == 1
    members = client.get(f"{V1}/runs", params={"sweep_id": sweep_id}).json()["data"]
    assert [m["id"] for m in members] == [r["id"] for r in runs]

    analysis = client.get(f"{V1}/sweeps/{sweep_id}/analysis")
    assert analysis.status_code == 200, analysis.text
    assert set(analysis.json()["swept"]) == {"width", "seed"}
    plot = client.get(f"{V1}/sweeps/{sweep_id}/plots/loss", params={"color_by": "width"})
    assert plot.status_code == 200 and plot.content.startswith(b"\x89PNG")


def test_concurrent_first_runs_create_one_experiment(db_url: str) -> None:
    """Eight scripts start at once: one sweep, eight distinct indexes."""
    import httpx

    results: list[dict[str, Any]] = []
    with TestClient(create_app(make_settings(db_url))) as app_client:
        app = app_client.app
        with live_server(app) as url:  # type: ignore[arg-type]

            def start(i: int) -> None:
                body = {"config": {"i": i}, "external": True, "experiment": "race"}
                response = httpx.post(f"{url}{V1}/runs", json=body, timeout=60)
                assert response.status_code == 201, response.text
                results.append(response.json())

            threads = [threading.Thread(target=start, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        sweeps = app_client.get(f"{V1}/sweeps").json()["data"]
    assert len(results) == 8
    assert len({r["sweep_id"] for r in results}) == 1
    assert sorted(r["index"] for r in results) == list(range(8))
    assert [(s["name"], s["run_count"]) for s in sweeps] == [("race", 8)]


def test_each_user_has_their_own_experiments(lab: Lab) -> None:
    """alice's and bob's "widths" are two sweeps, each owned by its user; a run of one user
    never joins the other's."""

    def join(who: str) -> dict[str, Any]:
        body = {"config": {}, "external": True, "experiment": "widths"}
        response = lab.post(who, "/runs", json=body)
        assert response.status_code == 201, response.text
        return response.json()  # type: ignore[no-any-return]

    alices, bobs, alices_again = join("alice"), join("bob"), join("alice")
    assert alices["sweep_id"] == alices_again["sweep_id"] != bobs["sweep_id"]
    assert (alices["index"], alices_again["index"], bobs["index"]) == (0, 1, 0)
    sweeps = lab.client.get(f"{V1}/sweeps", headers=lab.as_("admin")).json()["data"]
    assert sorted((s["owner"], s["run_count"]) for s in sweeps) == [("alice", 2), ("bob", 1)]


def test_the_cli_marks_an_experiment_in_the_sweep_list() -> None:
    import io

    from rich.console import Console

    from overparam.reports import print_sweeps

    out = io.StringIO()
    row = {"id": 3, "run_count": 2, "status_counts": {"running": 2}}
    row |= {"created_at": "2026-11-28T08:00:00Z", "owner": "local"}
    sweeps = [row | {"name": "widths", "kind": "experiment"}, row | {"id": 2, "name": "grid"}]
    print_sweeps(Console(file=out, width=120), sweeps)
    lines = out.getvalue().splitlines()
    assert any("widths (experiment)" in line for line in lines)
    assert not any("grid (experiment)" in line for line in lines)
