"""The compose stack as real processes (tests/deploy/topology.py) against a fresh PostgreSQL
database: a Ray head without CPUs, two worker nodes on this host, the API under uvicorn with two
workers, one dispatcher. A sweep submitted over REST runs to completion with every loss point
stored exactly once; token auth guards Ray; the compose health checks pass."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.topology import BIN_DIR, Topology, cmdline, marked, pg_topology

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

SPEC = {
    "name": "topo",
    "base": {"data": {"n": 8, "d": 4}, "width": 16, "steps": 200},
    "grid": {"seed": [0, 1, 2, 3]},
}
FINAL = {"succeeded", "diverged", "failed", "cancelled"}


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    with pg_topology(workers=2, dispatchers=1) as topo:
        yield topo


@pytest.fixture(scope="module")
def api(topology: Topology) -> Iterator[httpx.Client]:
    with topology.client() as client:
        yield client


def wait_final(api: httpx.Client, topo: Topology, sweep_id: int, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    runs: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        runs = api.get(
            "/api/v1/runs", params={"sweep_id": sweep_id, "fields": ["config", "manifest"]}
        ).json()["data"]
        if runs and all(r["status"] in FINAL for r in runs):
            return runs
        time.sleep(0.5)
    states = [r["status"] for r in runs]
    raise AssertionError(f"runs not final after {timeout}s: {states}\n{topo.report()}")


def metric_steps(api: httpx.Client, run_id: int, name: str) -> list[int]:
    steps: list[int] = []
    params: dict[str, Any] = {"name": name, "limit": 64}  # small pages: exercise the cursor
    while True:
        page = api.get(f"/api/v1/runs/{run_id}/metrics", params=params).json()
        steps += [p["step"] for p in page["data"] if p["metric"] == name]
        if not page["next_cursor"]:
            return steps
        params["cursor"] = page["next_cursor"]


def test_the_processes_have_the_compose_shape(topology: Topology, api: httpx.Client) -> None:
    ready = api.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["database"] == "ok"
    # uvicorn --workers 2: a supervisor with two worker processes
    children = [
        pid
        for pid in marked(f"{topology.id}/api")
        if any("spawn_main" in arg for arg in cmdline(pid))
    ]
    assert len(children) == 2, topology.report()

    nodes = {n["node_id"]: n for n in topology.nodes() if n["state"] == "ALIVE"}
    head = nodes[topology.procs["ray-head"].node_id() or ""]
    assert head["is_head_node"]
    assert "CPU" not in head["resources_total"] and "GPU" not in head["resources_total"]
    for worker in topology.workers():
        node = nodes[worker.node_id() or ""]
        assert node["resources_total"]["CPU"] == 1.0 and "GPU" not in node["resources_total"]
    assert len(nodes) == 3


def test_prometheus_scrapes_the_api_with_the_metrics_token(topology: Topology) -> None:
    """/metrics is closed without the token (API tokens are required) and, with it, reads the
    cluster as the dispatcher's heartbeat describes it."""
    assert httpx.get(f"{topology.base_url}/metrics", timeout=10).status_code == 401
    bearer = {"Authorization": f"Bearer {topology.metrics_token}"}
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.get(f"{topology.base_url}/metrics", headers=bearer, timeout=10)
        assert answer.status_code == 200, answer.text
        seen = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(answer.text)
            for s in family.samples
        }
        if seen[("overparam_ray_nodes", ())] == 2:
            break
        assert time.monotonic() < deadline, seen[("overparam_ray_nodes", ())]
        time.sleep(0.5)
    assert seen[("overparam_database_up", ())] == 1
    assert seen[("overparam_dispatchers", (("role", "leader"),))] == 1
    assert seen[("overparam_ray_gpus", ())] == 0


def test_ray_refuses_callers_without_the_token(topology: Topology) -> None:
    check = [str(BIN_DIR / "ray"), "health-check", f"--address={topology.addresses.ray_address}"]
    base = {"PATH": os.environ["PATH"], "HOME": str(topology.root)}  # no ~/.ray/auth_token
    wrong = {**base, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}
    callers = [subprocess.Popen(check, env=env, stderr=subprocess.PIPE) for env in (base, wrong)]
    for caller in callers:
        _, err = caller.communicate(timeout=60)
        assert caller.returncode != 0
        assert b"InvalidAuthToken" in err, err[-2000:]

    dashboard = f"{topology.dashboard_url}/api/v0/nodes"
    assert httpx.get(dashboard, timeout=10).status_code in (401, 403)
    assert topology.nodes(), "the dashboard answers with the token"


def test_every_compose_health_check_passes(topology: Topology) -> None:
    names = ("api", "ray-head", "ray-worker-1")
    with ThreadPoolExecutor(len(names)) as pool:  # each `ray health-check` takes a second
        for name, done in zip(names, pool.map(topology.healthcheck, names), strict=True):
            assert done.returncode == 0, (name, done.stdout, done.stderr)


def test_a_sweep_runs_to_completion_with_every_loss_step_once(
    topology: Topology, api: httpx.Client
) -> None:
    created = api.post("/api/v1/sweeps", json=SPEC)
    assert created.status_code == 201, created.text
    assert created.json()["run_count"] == 4
    runs = wait_final(api, topology, created.json()["id"])
    assert [r["status"] for r in runs] == ["succeeded"] * 4, [r["error"] for r in runs]
    for run in runs:
        assert metric_steps(api, run["id"], "loss") == list(range(201)), run["id"]

    # Ray placed the runs on the worker nodes, both of them (one CPU each), never on the head.
    workers = {w.node_id() for w in topology.workers()}
    deadline = time.monotonic() + 15
    while len(finished := [t for t in topology.tasks() if t["state"] == "FINISHED"]) < 4:
        assert time.monotonic() < deadline, topology.tasks()
        time.sleep(0.5)
    assert {t["node_id"] for t in finished} == workers


def test_faults_hit_exactly_the_process_they_name(topology: Topology) -> None:
    """The harness's fault helpers (for the resilience tests): kill one worker node, kill the
    dispatcher, and start replacements, without touching anything else."""
    first, second = topology.workers()[:2]
    head = topology.procs["ray-head"]
    spared = marked(f"{topology.id}/{second.name}") | marked(f"{topology.id}/{head.name}")
    dead_node = first.node_id()

    killed = topology.kill_worker(first.name)
    assert first.pid in killed and not first.alive()
    assert not marked(f"{topology.id}/{first.name}")
    assert not killed & spared and spared <= marked(f"{topology.id}/")
    Topology.wait_for(
        lambda: dead_node not in topology.alive_node_ids(),
        time.monotonic() + 30,
        "the GCS to mark the killed node dead",
    )
    third = topology.add_worker()
    topology.wait_nodes(2)
    assert third.node_id() in topology.alive_node_ids()

    dispatcher = topology.procs["dispatcher-1"]
    assert topology.kill_dispatcher(dispatcher.name) == {dispatcher.pid}
    assert not dispatcher.alive() and second.alive() and head.alive()
    assert topology.add_dispatcher().name == "dispatcher-2"
