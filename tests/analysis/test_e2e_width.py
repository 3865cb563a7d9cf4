"""End to end through a real local Ray: a small two-layer width sweep trained by the embedded
dispatcher, then the analysis endpoint's width slopes recomputed from the raw metric points by
numpy's least squares. The laziness measures must shrink with width (negative slopes)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from services.analysis import LAYER_METRICS
from tests.analysis.test_api import lstsq_fit, raw_points
from tests.conftest import make_settings

pytestmark = pytest.mark.ray

SPEC = {
    "name": "e2e-width",
    "base": {
        "arch": "two_layer",
        "data": {"n": 16, "d": 6},
        "steps": 150,
        "lr": 0.5,
        "gram_every": 25,
        "weights_every": 25,
        "theory_every": 25,
        "emit_every": 50,
    },
    "grid": {"width": [64, 256, 1024], "seed": [0, 1]},
}
FINAL = {"succeeded", "diverged", "failed", "cancelled"}


@pytest.fixture
def service(
    ray_cluster: None, tmp_path: Path, migrated_sqlite: Callable[[Path], str]
) -> Iterator[TestClient]:
    url = migrated_sqlite(tmp_path / "e2e.db")
    settings = make_settings(url, embedded_dispatcher=True, poll_interval_s=0.1)
    with TestClient(create_app(settings)) as client:
        yield client


def wait_final(client: TestClient, sweep_id: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 300  # a hung dispatcher fails here instead of hanging CI
    while True:
        runs = client.get(
            "/api/v1/runs", params={"sweep_id": sweep_id, "fields": ["config", "manifest"]}
        ).json()["data"]
        if all(r["status"] in FINAL for r in runs):
            return runs  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, [r["status"] for r in runs]
        time.sleep(0.2)


def test_width_sweep_slopes_match_the_raw_metrics(service: TestClient) -> None:
    created = service.post("/api/v1/sweeps", json=SPEC).json()
    runs = wait_final(service, created["id"])
    assert {r["status"] for r in runs} == {"succeeded"}, [r["error"] for r in runs]
    analysis = service.get(f"/api/v1/sweeps/{created['id']}/analysis").json()
    fits = {f["y"]: f for f in analysis["fits"] if f["kind"] == "power"}
    for key in ("neuron_dist_max", "weight_dist_rel", "pattern_flips"):
        name = LAYER_METRICS[key] + "layer1"
        x = np.log([r["overrides"]["width"] for r in runs])
        y = np.log([raw_points(service, r["id"], name)[-1][1] for r in runs])
        slope, low, high = lstsq_fit(x, y)
        assert fits[name]["slope"] == pytest.approx(slope, rel=1e-9)
        assert fits[name]["ci"] == pytest.approx([low, high], rel=1e-9)
        assert fits[name]["n_points"] == 6 and slope < 0
    run = service.get(f"/api/v1/runs/{runs[-1]['id']}/analysis").json()
    conv = run["convergence"]
    assert conv["fitted_rate"] < 0 and conv["theory_rate"] < 0
    assert 0.5 < conv["fitted_rate"] / conv["late_theory_rate"] < 2
    assert math.isfinite(run["spectrum"]["lambda0"])
    png = service.get(f"/api/v1/sweeps/{created['id']}/plots/scaling")
    assert png.status_code == 200 and png.content[:4] == b"\x89PNG"
