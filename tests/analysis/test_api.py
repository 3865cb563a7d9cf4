"""The analysis and plot endpoints on a synthetic two-layer width sweep (SQLite and
PostgreSQL). The scaling-law slopes, their intervals and the convergence rate are recomputed
from the raw metric points fetched through the API, by numpy's least squares."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from matplotlib import image
from scipy import stats

from services.analysis import ANALYSIS_VERSION, LATE_FRACTION, LAYER_METRICS
from tests.analysis.synthetic import (
    SEEDS,
    WIDTHS,
    Store,
    create_sweep,
    fill_width_sweep,
    run_points,
)
from worker.metric_names import LOSS, NTK_CHANGE

LAZINESS = [
    LAYER_METRICS[key] + "layer1" for key in ("neuron_dist_max", "weight_dist_rel", "pattern_flips")
]


@pytest.fixture
def store(db_url: str) -> Iterator[Store]:
    s = Store(db_url)
    yield s
    s.close()


@pytest.fixture
def width_sweep(client: TestClient, store: Store) -> tuple[int, list[dict[str, Any]]]:
    sweep_id, runs = create_sweep(client)
    fill_width_sweep(store, runs)
    return sweep_id, runs


def raw_points(client: TestClient, run_id: int, name: str) -> list[tuple[int, float]]:
    """Every point of one metric, following the cursor (no downsampling)."""
    points, params = [], {"name": name, "limit": 50}
    while True:
        page = client.get(f"/api/v1/runs/{run_id}/metrics", params=params).json()
        points += [(p["step"], float(p["value"])) for p in page["data"]]
        if not page["next_cursor"]:
            return points
        params["cursor"] = page["next_cursor"]


def lstsq_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(slope, CI low, CI high) by lstsq and the σ²(AᵀA)⁻¹ covariance, Student-t 95%."""
    design = np.column_stack([x, np.ones_like(x)])
    coef, residual, _, _ = np.linalg.lstsq(design, y, rcond=None)
    stderr = math.sqrt(float(residual[0]) / (len(x) - 2) * np.linalg.inv(design.T @ design)[0, 0])
    half = stats.t.ppf(0.975, len(x) - 2) * stderr
    return float(coef[0]), float(coef[0] - half), float(coef[0] + half)


def test_scaling_slopes_agree_with_an_independent_least_squares(
    client: TestClient, width_sweep: tuple[int, list[dict[str, Any]]]
) -> None:
    sweep_id, runs = width_sweep
    analysis = client.get(f"/api/v1/sweeps/{sweep_id}/analysis").json()
    assert analysis["swept"] == ["width", "seed"]
    assert analysis["status_counts"] == {"succeeded": len(WIDTHS) * len(SEEDS)}
    fits = {f["y"]: f for f in analysis["fits"] if f["x"] == "width" and f["kind"] == "power"}
    for name in [*LAZINESS, NTK_CHANGE]:
        xs, ys = [], []
        for run in runs:
            xs.append(math.log(run["overrides"]["width"]))
            ys.append(math.log(raw_points(client, run["id"], name)[-1][1]))
        slope, low, high = lstsq_fit(np.array(xs), np.array(ys))
        fit = fits[name]
        assert fit["n_points"] == len(runs) and fit["group"] == {}
        assert fit["slope"] == pytest.approx(slope, rel=1e-9)
        assert fit["ci"] == pytest.approx([low, high], rel=1e-9)
        assert low < -0.5 < high, f"{name}: the synthetic law is m^-1/2"
        assert fit["reference_slope"] == -0.5 and fit["consistent_with_reference"] is True
    groups = {g["params"]["width"]: g for g in analysis["groups"]}
    assert sorted(groups) == list(WIDTHS) and all(
        len(g["run_ids"]) == len(SEEDS) for g in groups.values()
    )
    (smallest,) = analysis["smallest_width"]
    assert smallest["smallest_width_all"] == WIDTHS[0]


def test_run_rate_agrees_with_an_independent_least_squares(
    client: TestClient, width_sweep: tuple[int, list[dict[str, Any]]]
) -> None:
    _, runs = width_sweep
    run = runs[-1]
    result = client.get(f"/api/v1/runs/{run['id']}/analysis").json()
    loss = raw_points(client, run["id"], LOSS)
    last = loss[-1][0]
    late = [(s, math.log(v)) for s, v in loss if s >= last - LATE_FRACTION * last]
    slope, low, high = lstsq_fit(np.array([s for s, _ in late]), np.array([v for _, v in late]))
    conv = result["convergence"]
    assert conv["fitted_rate"] == pytest.approx(slope, rel=1e-9)
    assert conv["fit"]["ci"] == pytest.approx([low, high], rel=1e-6, abs=1e-12)
    assert conv["rate_ratio"] == pytest.approx(1.0, rel=1e-6)
    assert result["run_id"] == run["id"] and result["status"] == "succeeded"
    assert result["regime"]["in_regime"] is True


def test_a_stored_analysis_is_served_unless_recomputed(client: TestClient, store: Store) -> None:
    _, runs = create_sweep(client)
    run_id = runs[0]["id"]
    store.move(run_id, "queued", "running")
    store.write(run_id, run_points(64, 0, upto=60))
    partial = client.get(f"/api/v1/runs/{run_id}/analysis").json()
    assert partial["status"] == "running" and partial["steps_done"] == 60
    stored = {"version": ANALYSIS_VERSION, "note": "stored by the dispatcher"}
    store.move(run_id, "running", "succeeded", summary={"analysis": stored})
    assert client.get(f"/api/v1/runs/{run_id}/analysis").json()["note"] == stored["note"]
    fresh = client.get(f"/api/v1/runs/{run_id}/analysis", params={"recompute": True}).json()
    assert "note" not in fresh and fresh["steps_done"] == 60
    custom = client.get(f"/api/v1/runs/{run_id}/analysis", params={"loss_threshold": 5.0}).json()
    assert custom["threshold"]["source"] == "request" and custom["threshold"]["reached"]


def test_unknown_ids_and_bad_parameters_are_problems(client: TestClient) -> None:
    for path in (
        "/api/v1/runs/999/analysis",
        "/api/v1/sweeps/999/analysis",
        "/api/v1/sweeps/999/plots/loss",
    ):
        response = client.get(path)
        assert response.status_code == 404
        assert response.headers["content-type"] == "application/problem+json"
    response = client.get("/api/v1/runs/1/analysis", params={"loss_threshold": -1})
    assert response.status_code == 422
    assert client.get("/api/v1/sweeps/1/plots/pie").status_code == 422


def png_pixels(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return image.imread(io.BytesIO(data), format="png")


def test_plots_are_non_blank_pngs(
    client: TestClient, width_sweep: tuple[int, list[dict[str, Any]]]
) -> None:
    sweep_id, runs = width_sweep
    for kind in ("loss", "lambda_min", "lambda0_ratio", "scaling", "movement"):
        response = client.get(f"/api/v1/sweeps/{sweep_id}/plots/{kind}")
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == "image/png"
        pixels = png_pixels(response.content)
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300
        assert pixels[..., :3].std() > 0.05, f"{kind} plot is blank"
    run_png = client.get(f"/api/v1/runs/{runs[0]['id']}/plots/loss")
    assert run_png.status_code == 200 and png_pixels(run_png.content)[..., :3].std() > 0.05
    by_seed = client.get(f"/api/v1/sweeps/{sweep_id}/plots/loss", params={"color_by": "seed"})
    assert by_seed.status_code == 200


def test_plots_without_data_are_404(client: TestClient) -> None:
    sweep_id, runs = create_sweep(client)
    assert client.get(f"/api/v1/sweeps/{sweep_id}/plots/loss").status_code == 404
    response = client.get(f"/api/v1/sweeps/{sweep_id}/plots/scaling")
    assert response.status_code == 404 and "scaling" in response.json()["detail"]
    assert client.get(f"/api/v1/runs/{runs[0]['id']}/plots/movement").status_code == 404
