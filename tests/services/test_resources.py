"""Per-run resource requests: estimates, explicit values, and refusal of runs that fit nowhere."""

from __future__ import annotations

from fastapi.testclient import TestClient

from services.db import make_engine, make_sessionmaker, session_scope
from services.models import DispatcherRecord, utcnow
from services.resources import (
    MIB,
    ResourceRequest,
    ResourceSpec,
    estimate_memory_bytes,
    resolve,
    why_it_cannot_fit,
)
from services.settings import Settings
from worker.config import DataConfig, RunConfig

SETTINGS = Settings(database_url="sqlite://", embedded_dispatcher=False)


def test_estimate_counts_parameters_activations_and_grams() -> None:
    cfg = RunConfig(arch="fc", depth=3, width=512, data=DataConfig(n=256, d=32))
    params = cfg.parameter_count() * 8 * 4
    grams = 256**2 * 8 * (3 + 1 + 2)
    assert estimate_memory_bytes(cfg) >= params + grams
    wider = cfg.model_copy(update={"width": 1024})
    more_points = cfg.model_copy(update={"data": DataConfig(n=512, d=32)})
    assert estimate_memory_bytes(wider) > estimate_memory_bytes(cfg)
    assert estimate_memory_bytes(more_points) > estimate_memory_bytes(cfg)


def test_resolve_prefers_the_spec_and_defaults_to_settings() -> None:
    cfg = RunConfig()
    default = resolve(ResourceSpec(), cfg, SETTINGS)
    assert default.cpus == SETTINGS.run_cpus and default.gpus == SETTINGS.run_gpus
    assert default.memory_bytes > estimate_memory_bytes(cfg)
    explicit = resolve(ResourceSpec(cpus=2, gpus=0.25, memory_mb=100), cfg, SETTINGS)
    assert explicit == ResourceRequest(cpus=2, gpus=0.25, memory_bytes=100 * MIB)


def test_fit_needs_one_node_with_everything() -> None:
    nodes = [
        {"CPU": 8.0, "GPU": 0.0, "memory": 64e9},
        {"CPU": 2.0, "GPU": 1.0, "memory": 8e9},
    ]
    assert why_it_cannot_fit(ResourceRequest(2, 0.5, 1 << 30), nodes) is None
    reason = why_it_cannot_fit(ResourceRequest(4, 1, 1 << 30), nodes)
    assert reason is not None and "largest worker has 2 CPU, 1 GPU" in reason
    assert why_it_cannot_fit(ResourceRequest(64, 8, 1 << 50), []) is None  # nothing known yet


def test_resource_spec_validation(client: TestClient) -> None:
    response = client.post("/api/v1/sweeps", json={"resources": {"gpus": 1.5}})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "resources.gpus"
    response = client.post("/api/v1/sweeps", json={"resources": {"cpus": 0, "tpus": 1}})
    assert {e["field"] for e in response.json()["errors"]} == {"resources.cpus", "resources.tpus"}


def test_a_run_that_fits_on_no_worker_is_refused_at_submission(
    client: TestClient, db_url: str
) -> None:
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        db.add(
            DispatcherRecord(
                id="test",
                host="h",
                pid=1,
                leader=True,
                heartbeat_at=utcnow(),
                nodes=[{"CPU": 4.0, "GPU": 0.0, "memory": 16e9}],
            )
        )
    engine.dispose()
    spec = {"grid": {"width": [64, 128]}, "resources": {"gpus": 0.5}}
    response = client.post("/api/v1/sweeps", json=spec)
    assert response.status_code == 422, response.text
    error = response.json()["errors"][0]
    assert error["field"] == "resources" and error["value"]["gpus"] == 0.5
    assert "0 GPU" in error["reason"] and "width=64" in error["reason"]
    assert client.get("/api/v1/sweeps").json()["count"] == 0

    fine = client.post("/api/v1/sweeps", json={"resources": {"cpus": 2}})
    assert fine.status_code == 201
    run = client.get(f"/api/v1/runs/{fine.json()['run_ids'][0]}").json()
    assert run["config"]["width"] == 256
