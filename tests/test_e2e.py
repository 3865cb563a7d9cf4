"""End to end through a real local Ray: submit over REST → the embedded dispatcher trains every
run → every metric is present with consecutive steps, and λ_min(H(0)) matches an independent
torch.func Jacobian of the same network. Also: failures stay isolated, cancel stops a run."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
import torch
from fastapi.testclient import TestClient

from api.main import create_app
from services.settings import Settings
from tests.conftest import make_settings
from tests.worker.reference import jacobian_grams, network_params
from worker.config import RunConfig
from worker.data import make_dataset
from worker.models import build_network

pytestmark = pytest.mark.ray

SPEC = {
    "name": "e2e",
    "base": {"data": {"n": 16, "d": 6}, "steps": 120, "gram_every": 10, "emit_every": 25},
    "grid": {"width": [32, 128], "seed": [0, 1]},
    "runs": [{"arch": "two_layer"}, {"arch": "fc", "depth": 2, "lr": 0.02}],
}
FINAL = {"succeeded", "diverged", "failed", "cancelled"}


@pytest.fixture
def service(ray_cluster: None, db_url: str) -> Iterator[TestClient]:
    settings = make_settings(db_url, embedded_dispatcher=True, poll_interval_s=0.1)
    with TestClient(create_app(settings)) as client:
        yield client


def wait_final(client: TestClient, sweep_id: int, timeout: float = 180.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = client.get(
            "/api/v1/runs", params={"sweep_id": sweep_id, "fields": ["config", "manifest"]}
        ).json()["data"]
        if all(r["status"] in FINAL for r in runs):
            return runs  # type: ignore[no-any-return]
        time.sleep(0.3)
    raise AssertionError(f"runs not finished after {timeout}s: {[r['status'] for r in runs]}")


def all_points(client: TestClient, run_id: int) -> list[dict[str, Any]]:
    points, params = [], {"limit": 500}
    while True:
        page = client.get(f"/api/v1/runs/{run_id}/metrics", params=params).json()
        points += page["data"]
        if not page["next_cursor"]:
            return points
        params["cursor"] = page["next_cursor"]


def test_sweep_runs_to_completion_with_every_metric(service: TestClient) -> None:
    deadline = time.monotonic() + 60  # ready once the dispatcher's first heartbeat is in
    while (ready := service.get("/readyz")).status_code == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ready.json()["ray"] == "ok", ready.text
    created = service.post("/api/v1/sweeps", json=SPEC).json()
    assert created["run_count"] == 8
    runs = wait_final(service, created["id"])
    assert [r["status"] for r in runs] == ["succeeded"] * 8, [r["error"] for r in runs]
    for run in runs:
        cfg = RunConfig.model_validate(run["config"])
        points = all_points(service, run["id"])
        keys = [(p["metric"], p["step"]) for p in points]
        assert len(keys) == len(set(keys)), "no point doubled"
        loss_steps = [s for m, s in keys if m == "loss"]
        assert loss_steps == list(range(cfg.steps + 1)), "loss at every step 0..last"
        for name in ("ntk_lambda_min", "ntk_lambda_max"):
            assert [s for m, s in keys if m == name] == list(range(0, cfg.steps + 1, 10))
        summary = run["summary"]
        assert summary["steps_done"] == cfg.steps
        assert summary["final_loss"] < summary["initial_loss"]
        assert 0 < summary["lambda_min_min"] <= summary["lambda_min_initial"] * 1.5
        assert run["manifest"]["data_checksum"] == make_dataset(cfg).checksum
        assert run["attempt"] == 1 and run["finished_at"]
        analysis = summary["analysis"]  # stored by the dispatcher with the final state
        assert analysis["steps_done"] == cfg.steps and analysis["convergence"]

        lambda0 = next(
            p["value"] for p in points if p["metric"] == "ntk_lambda_min" and p["step"] == 0
        )
        net = build_network(cfg)
        params, trained = network_params(net)
        X = make_dataset(cfg).X
        ntk = sum(jacobian_grams(cfg, params, trained, X).values())
        reference = torch.linalg.eigvalsh(ntk)[0].item()
        assert lambda0 == pytest.approx(reference, rel=1e-8)


def test_divergence_and_failure_stay_isolated(service: TestClient) -> None:
    spec = {
        "name": "mixed",
        "base": {"data": {"n": 8, "d": 4}, "steps": 60, "width": 16},
        "runs": [{"lr": 0.1}, {"lr": 500.0, "divergence_bound": 1e8}, {"lr": 0.1, "seed": 3}],
    }
    created = service.post("/api/v1/sweeps", json=spec).json()
    runs = wait_final(service, created["id"])
    assert [r["status"] for r in runs] == ["succeeded", "diverged", "succeeded"]
    assert "loss" in runs[1]["error"]


def test_a_crashing_task_fails_only_its_run(ray_cluster: None, db_url: str) -> None:
    """A task that raises is reported as failed with its exception; its neighbours succeed."""
    import asyncio

    from services.db import make_engine, make_sessionmaker, session_scope
    from services.dispatcher import Dispatcher, Launch
    from services.models import Run
    from services.sweeps import SweepSpec, create_sweep
    from worker.task import run_training

    @ray.remote
    def exploding(config: dict[str, Any]) -> Iterator[Any]:
        yield from []
        raise RuntimeError(f"boom in run with seed {config['seed']}")

    def submit(launch: Launch) -> Any:
        if launch.run.config["seed"] == 1:
            return exploding.options(num_cpus=1).remote(launch.run.config)
        return run_training.options(num_cpus=1).remote(
            launch.run.config, checkpoint_dir=launch.checkpoint_dir
        )

    settings = Settings(database_url=db_url, embedded_dispatcher=False, poll_interval_s=0.05)
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as db:
        spec = SweepSpec(base={"data": {"n": 8, "d": 4}, "steps": 30}, grid={"seed": [0, 1, 2]})
        sweep_id = create_sweep(db_session=db, spec=spec, settings=settings).id
    dispatcher = Dispatcher(settings, sessions, submit=submit)

    async def drive() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(dispatcher.run(stop))
        for _ in range(600):
            await asyncio.sleep(0.1)
            with session_scope(sessions) as db:
                states = [r.status for r in db.query(Run).filter(Run.sweep_id == sweep_id)]
            if all(s not in ("queued", "running") for s in states):
                break
        stop.set()
        await loop

    asyncio.run(drive())
    with session_scope(sessions) as db:
        runs = db.query(Run).filter(Run.sweep_id == sweep_id).order_by(Run.index).all()
        assert [r.status for r in runs] == ["succeeded", "failed", "succeeded"]
        assert (
            runs[1].error is not None and "RuntimeError: boom in run with seed 1" in runs[1].error
        )
    engine.dispose()


def test_cancel_stops_a_running_run(service: TestClient) -> None:
    spec = {"base": {"data": {"n": 8, "d": 4}, "width": 16, "steps": 1_000_000}}
    run_id = service.post("/api/v1/sweeps", json=spec).json()["run_ids"][0]
    deadline = time.monotonic() + 60
    while service.get(f"/api/v1/runs/{run_id}").json()["summary"].get("steps_done", 0) < 50:
        assert time.monotonic() < deadline, "run never started"
        time.sleep(0.2)
    assert service.post(f"/api/v1/runs/{run_id}/cancel").json()["cancel_requested"]
    while (run := service.get(f"/api/v1/runs/{run_id}").json())["status"] == "running":
        assert time.monotonic() < deadline + 60, "run never stopped"
        time.sleep(0.2)
    assert run["status"] == "cancelled"
    assert 0 < run["summary"]["steps_done"] < 1_000_000


def test_a_worker_that_dies_is_retried_and_resumes_from_its_checkpoint(
    ray_cluster: None, db_url: str, tmp_path: Any
) -> None:
    """Attempt 1 trains past a checkpoint and its worker process dies (os._exit); the run is
    re-queued, attempt 2 resumes from the checkpoint, and every step is stored exactly once."""
    import asyncio

    from services.db import make_engine, make_sessionmaker, session_scope
    from services.dispatcher import Dispatcher, Launch
    from services.history import Selection, read_page, resolve
    from services.models import Run
    from services.sweeps import SweepSpec, create_sweep
    from worker.events import MetricBatch
    from worker.task import run_training

    @ray.remote(max_retries=0)
    def dies_midway(
        config: dict[str, Any], checkpoint_dir: str, resume_at_most: int
    ) -> Iterator[Any]:
        import os

        from worker.train import train

        cfg = RunConfig.model_validate(config)
        events = train(cfg, checkpoint_dir=checkpoint_dir, resume_at_most=resume_at_most)
        for event in events:
            yield event
            if isinstance(event, MetricBatch) and max(s for _, s, _ in event.points) >= 150:
                os._exit(1)

    def submit(launch: Launch) -> Any:
        task = dies_midway if launch.run.attempt == 1 else run_training
        return task.options(num_cpus=1).remote(
            launch.run.config,
            checkpoint_dir=launch.checkpoint_dir,
            resume_at_most=launch.resume_at_most,
        )

    settings = Settings(
        database_url=db_url,
        embedded_dispatcher=False,
        poll_interval_s=0.05,
        checkpoint_dir=tmp_path,
    )
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as db:
        spec = SweepSpec(
            base={"data": {"n": 8, "d": 4}, "steps": 300, "checkpoint_every": 100, "emit_every": 25}
        )
        run_id = create_sweep(db_session=db, spec=spec, settings=settings).id
    dispatcher = Dispatcher(settings, sessions, submit=submit)

    async def drive() -> None:
        stop = asyncio.Event()
        loop = asyncio.create_task(dispatcher.run(stop))
        for _ in range(1200):
            await asyncio.sleep(0.1)
            with session_scope(sessions) as db:
                run = db.get(Run, run_id)
                assert run is not None
                if run.status not in ("queued", "running"):
                    break
        stop.set()
        await loop

    asyncio.run(drive())
    with session_scope(sessions) as db:
        run = db.get(Run, run_id)
        assert run is not None
        assert (run.status, run.attempt, run.error) == ("succeeded", 2, None)
        loss_id = resolve(db_session=db, run_ids=[run_id], names=["loss"], what="run")
        (loss,), _ = read_page(
            db_session=db, selection=Selection([run_id], loss_id), after=None, limit=10_000
        )
        assert loss.points.steps.tolist() == list(range(301))
    engine.dispose()
