"""Runs survive the cluster's failures (issue 5), on the compose topology as real processes:
mid-sweep, SIGKILL a worker node → its runs resume elsewhere from their checkpoints; SIGKILL
the leading dispatcher → the standby takes the lock, re-queues the orphaned runs and they
resume. Afterwards every run succeeded and every step of every metric is stored exactly once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select

from services.models import DispatcherRecord
from tests.deploy.topology import Topology, pg_topology

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

STEPS, CHECKPOINT_EVERY, GRAM_EVERY = 12_000, 500, 100
SPEC = {
    "name": "faults",
    "base": {
        "data": {"n": 32, "d": 8},
        "width": 256,
        "steps": STEPS,
        "lr": 0.05,
        "gram_every": GRAM_EVERY,
        "checkpoint_every": CHECKPOINT_EVERY,
        "emit_every": 100,
    },
    "grid": {"seed": [0, 1, 2, 3]},
}
FINAL = {"succeeded", "diverged", "failed", "cancelled"}


@pytest.fixture(scope="module")
def topology() -> Iterator[Topology]:
    with pg_topology(workers=2, dispatchers=2) as topo:
        yield topo


def runs_of(api: httpx.Client, sweep_id: int) -> list[dict[str, Any]]:
    return api.get(
        "/api/v1/runs", params={"sweep_id": sweep_id, "fields": ["config", "manifest"]}
    ).json()["data"]  # type: ignore[no-any-return]


def leader_name(topo: Topology) -> str:
    engine = create_engine(topo.addresses.database_url)
    try:
        with engine.connect() as conn:
            pids = set(
                conn.scalars(select(DispatcherRecord.pid).where(DispatcherRecord.leader.is_(True)))
            )
    finally:
        engine.dispose()
    alive = {
        p.pid: name for name, p in topo.procs.items() if p.service == "dispatcher" and p.alive()
    }
    # the dispatcher process is `overparam dispatch` itself (a console script: one process)
    names = [alive[pid] for pid in pids if pid in alive]
    assert len(names) == 1, f"one live leader expected, got {names} for pids {pids}"
    return names[0]


def steps_of(api: httpx.Client, run_id: int) -> dict[str, list[int]]:
    steps: dict[str, list[int]] = {}
    params: dict[str, Any] = {"limit": 20_000}
    while True:
        page = api.get(f"/api/v1/runs/{run_id}/metrics", params=params).json()
        for p in page["data"]:
            steps.setdefault(p["metric"], []).append(p["step"])
        if not page["next_cursor"]:
            return steps
        params["cursor"] = page["next_cursor"]


def test_runs_survive_a_worker_kill_and_a_dispatcher_kill(topology: Topology) -> None:
    topo = topology
    with topo.client() as api:
        sweep_id = api.post("/api/v1/sweeps", json=SPEC).json()["id"]
        deadline = time.monotonic() + 120

        def past_a_checkpoint() -> bool:
            return any(
                r["status"] == "running"
                and r["summary"].get("steps_done", 0) > 2 * CHECKPOINT_EVERY
                for r in runs_of(api, sweep_id)
            )

        Topology.wait_for(past_a_checkpoint, deadline, "a run past its first checkpoint")
        busy = topo.workers_running()
        assert busy, topo.report()
        victim = busy[0].name
        topo.kill_worker(victim)
        topo.add_worker(wait=False)  # capacity comes back, as a restarted machine would

        def retried() -> bool:
            return any(r["attempt"] >= 2 for r in runs_of(api, sweep_id))

        Topology.wait_for(retried, time.monotonic() + 120, f"a retry after killing {victim}")

        def running_again() -> bool:
            return any(r["status"] == "running" for r in runs_of(api, sweep_id))

        Topology.wait_for(running_again, time.monotonic() + 60, "runs running again")
        first_leader = leader_name(topo)
        topo.kill_dispatcher(first_leader)

        def new_leader() -> bool:
            try:
                return leader_name(topo) != first_leader
            except AssertionError:
                return False

        Topology.wait_for(new_leader, time.monotonic() + 60, "the standby taking over")

        def all_final() -> bool:
            return all(r["status"] in FINAL for r in runs_of(api, sweep_id))

        Topology.wait_for(all_final, time.monotonic() + 300, "every run finished")
        runs = runs_of(api, sweep_id)
        assert [r["status"] for r in runs] == ["succeeded"] * 4, (
            [(r["status"], r["error"]) for r in runs],
            topo.report(),
        )
        assert max(r["attempt"] for r in runs) >= 2, "some run was interrupted and retried"
        for run in runs:
            steps = steps_of(api, run["id"])
            assert steps["loss"] == list(range(STEPS + 1)), f"run {run['id']}: loss steps"
            assert steps["ntk_lambda_min"] == list(range(0, STEPS + 1, GRAM_EVERY))
            for name, seen in steps.items():
                assert len(seen) == len(set(seen)), f"run {run['id']}: {name} doubled"
