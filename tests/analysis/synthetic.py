"""Synthetic sweeps for the analysis, dashboard and watch tests: runs created over the API,
metric points written straight through the store's ingestion function, states set with the
guarded transitions — fast and deterministic, no Ray.

The synthetic two-layer width sweep follows known laws: per-neuron movement, relative weight
change, pattern flips and Gram change ∝ m^−½ (with seeded log-normal scatter), and a loss that
falls geometrically at 2·ln(1 − η λ_min(H(0))) per step.
"""

from __future__ import annotations

import contextlib
import math
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import uvicorn
from fastapi import FastAPI

from services.analysis import LAMBDA0, LAYER_METRICS, RUN_LR, Y_HINV_Y
from services.db import make_engine, make_sessionmaker, session_scope
from services.metrics import write_points
from services.runs import transition
from worker.metric_names import LAMBDA_MAX, LAMBDA_MIN, LOSS, NTK_CHANGE, PREDICTED_LOSS
from worker.metrics import LayerDistance, Point

WIDTHS = (64, 256, 1024)
SEEDS = (0, 1, 2)
STEPS = 200
LR = 0.5
LAMBDA_0 = 0.1
SCATTER = 0.08  # log-normal scatter of the laziness measures around their power law
SPEC: dict[str, Any] = {
    "name": "synthetic-width",
    "base": {"arch": "two_layer", "data": {"n": 16, "d": 4}, "steps": STEPS, "lr": LR},
    "grid": {"width": list(WIDTHS), "seed": list(SEEDS)},
}


def lambda_min0(width: int) -> float:
    return LAMBDA_0 * (1 + 0.5 / math.sqrt(width))


def run_points(width: int, seed: int, upto: int = STEPS, start: int = 0) -> list[Point]:
    """Steps start..upto of one synthetic run of the width sweep."""
    rng = np.random.default_rng(1000 * width + seed)
    scatter = np.exp(SCATTER * rng.standard_normal(4))
    lam0 = lambda_min0(width)
    initial_loss = 8.0 + seed
    points: list[Point] = []
    if start == 0:
        points += [
            (LAMBDA0, 0, LAMBDA_0),
            (RUN_LR, 0, LR),
            (Y_HINV_Y, 0, 40.0 + seed),
        ]
    for k in range(start, upto + 1):
        points.append((LOSS, k, initial_loss * (1 - LR * lam0) ** (2 * k)))
        if k % 10:
            continue
        progress = k / STEPS
        lam = lam0 * (1 - 0.4 / math.sqrt(width) * progress)
        points += [
            (LAMBDA_MIN, k, lam),
            (LAMBDA_MAX, k, 2.0),
            (NTK_CHANGE, k, 0.9 * width**-0.5 * scatter[0] * progress),
            (PREDICTED_LOSS, k, initial_loss * (1 - LR * LAMBDA_0) ** (2 * k)),
            (
                LAYER_METRICS["pattern_flips"] + "layer1",
                k,
                2.0 * width**-0.5 * scatter[1] * progress,
            ),
        ]
        distance = LayerDistance(
            absolute=6.0 * scatter[2] * progress,
            relative=5.0 * width**-0.5 * scatter[2] * progress,
            per_sqrt_width=6.0 * width**-0.5 * scatter[2] * progress,
            max_neuron=25.0 * width**-0.5 * scatter[3] * progress,
        )
        points += distance.points("layer1", k)
    return points


def create_sweep(client: Any, spec: dict[str, Any] = SPEC) -> tuple[int, list[dict[str, Any]]]:
    """POST the spec; (sweep id, its runs as the API lists them)."""
    created = client.post("/api/v1/sweeps", json=spec)
    assert created.status_code == 201, created.text
    sweep_id = created.json()["id"]
    runs = client.get(
        "/api/v1/runs", params={"sweep_id": sweep_id, "fields": ["config", "manifest"]}
    ).json()["data"]
    return sweep_id, runs


class Store:
    """Writes to the service's database the way the dispatcher does."""

    def __init__(self, database_url: str) -> None:
        self.engine = make_engine(database_url)
        self.sessions = make_sessionmaker(self.engine)

    def write(self, run_id: int, points: Sequence[Point]) -> None:
        with session_scope(self.sessions) as db:
            write_points(db_session=db, run_id=run_id, points=points)

    def move(self, run_id: int, expected: str, new: str, **fields: Any) -> None:
        with session_scope(self.sessions) as db:
            assert transition(db_session=db, run_id=run_id, expected=expected, new=new, **fields)

    def finish(self, run_id: int, points: Sequence[Point], status: str = "succeeded") -> None:
        self.move(run_id, "queued", "running")
        self.write(run_id, points)
        self.move(run_id, "running", status)

    def close(self) -> None:
        self.engine.dispose()


def fill_width_sweep(store: Store, runs: Sequence[dict[str, Any]]) -> None:
    """Every run of a SPEC sweep trained and succeeded."""
    for run in runs:
        store.finish(run["id"], run_points(run["overrides"]["width"], run["overrides"]["seed"]))


@contextlib.contextmanager
def live_server(app: FastAPI) -> Iterator[str]:
    """``app`` served by uvicorn in a thread on a free port; yields its base URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(app, port=port, log_level="warning", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
