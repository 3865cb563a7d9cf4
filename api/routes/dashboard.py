"""The dashboard: one static page (``api/static``) over the REST API and its SSE streams.

No build step: plain HTML, CSS and JavaScript, with uPlot (MIT, from the npm registry) vendored
under ``api/static/vendor``. The page learns the worker's metric names from its ``<body>``
attributes, filled in here from :mod:`worker.metrics`.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from services.errors import NotFound
from worker.metric_names import LAMBDA_MIN, LOSS

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["dashboard"], include_in_schema=False)


@cache
def page() -> str:
    try:
        html = (STATIC_DIR / "dashboard.html").read_text()
    except FileNotFoundError:
        raise NotFound(f"the dashboard is not installed here ({STATIC_DIR} is missing)") from None
    return html.replace("__LOSS__", LOSS).replace("__LAMBDA_MIN__", LAMBDA_MIN)


@router.get("/")
def root() -> RedirectResponse:
    """The dashboard is the service's front page."""
    return RedirectResponse("/dashboard")


@router.get("/dashboard", response_class=HTMLResponse)
def dashboard() -> HTMLResponse:
    """Sweeps and runs with their states, live charts from the streams, the sweep analysis."""
    return HTMLResponse(page(), headers={"Cache-Control": "no-cache"})


def mount_static(app: FastAPI) -> None:
    """Serve ``api/static`` (the page's script, styles and vendored chart library); an
    installation without it still starts (its API does not need the page)."""
    app.mount("/static", StaticFiles(directory=STATIC_DIR, check_dir=False), name="static")
