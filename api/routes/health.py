"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.problems import problem, problem_responses
from services.cluster import READY_TIMEOUT, leader

router = APIRouter(tags=["health"])


@router.get("/livez")
def livez() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=problem_responses(503))
def readyz(request: Request) -> dict[str, str] | JSONResponse:
    """Ready: the database answers, a dispatcher leads (its heartbeat is recent; in a split
    deployment the API reads the dispatcher's heartbeat row), and Ray is connected when this
    process dispatches. 503 otherwise: queued runs would not start."""
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
            leading = leader(db_session=session, within=READY_TIMEOUT)
    except Exception as exc:
        return problem(503, "Not ready", f"database unreachable: {type(exc).__name__}")
    if leading is None:
        seconds = int(READY_TIMEOUT.total_seconds())
        return problem(503, "Not ready", f"no dispatcher has led in the last {seconds} s")
    checks = {"database": "ok", "dispatcher": "ok"}
    if request.app.state.settings.embedded_dispatcher:
        import ray

        if not ray.is_initialized():
            return problem(503, "Not ready", "Ray is not connected")
        checks["ray"] = "ok"
    return {"status": "ok"} | checks
