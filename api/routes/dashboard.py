"""The dashboard: one static page (``api/static``) over the REST API and its SSE streams.

No build step: plain HTML, CSS and JavaScript, with uPlot (MIT, from the npm registry) vendored
under ``api/static/vendor``. The page learns the worker's metric names from its ``<body>``
attributes and the label of every quantity (:mod:`services.quantities`, the same the PNG plots
and the CLI show) from a JSON block, both filled in here.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from services.errors import NotFound
from services.quantities import catalogue
from worker.metric_names import LAMBDA_MAX, LAMBDA_MIN, LAYER_METRICS, LOSS, PREDICTED_LOSS

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["dashboard"], include_in_schema=False)


def page_catalogue() -> str:
    """The labels and the metric names the page's script uses, as JSON safe inside <script>."""
    metrics = {
        "loss": LOSS,
        "lambdaMin": LAMBDA_MIN,
        "lambdaMax": LAMBDA_MAX,
        "predictedLoss": PREDICTED_LOSS,
        "movement": LAYER_METRICS["weight_dist_rel"],
    }
    return json.dumps(catalogue() | {"metrics": metrics}).replace("</", "<\\/")


@cache
def page() -> str:
    try:
        html = (STATIC_DIR / "dashboard.html").read_text()
    except FileNotFoundError:
        raise NotFound(f"the dashboard is not installed here ({STATIC_DIR} is missing)") from None
    html = html.replace("__LOSS__", LOSS).replace("__LAMBDA_MIN__", LAMBDA_MIN)
    return html.replace("__QUANTITIES__", page_catalogue())


@router.get("/")
def root() -> RedirectResponse:
    """The dashboard is the service's front page."""
    return RedirectResponse("/dashboard")


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    """Sweeps, external runs and per-run pages: live charts from the streams, the analyses."""
    return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    """Serve ``api/static`` (the page's script, styles and vendored chart library); an
    installation without it still starts (its API does not need the page)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
