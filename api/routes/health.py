"""Liveness and readiness probes."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.problems import problem, problem_responses
from services.cluster import leader

router = APIRouter(tags=["health"])


@router.get("/livez")
def livez() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None, responses=problem_responses(503))
def readyz(request: Request) -> dict[str, str] | JSONResponse:
    """The database answers, and Ray is connected when this process dispatches; also says
    whether a dispatcher leads (from its heartbeat)."""
    try:
        with request.app.state.sessions() as session:
            session.execute(text("SELECT 1"))
    except Exception as exc:
        return problem(503, "Not ready", f"database unreachable: {type(exc).__name__}")
    checks = {"database": "ok"}
    with request.app.state.sessions() as session:
        # Informational: the API accepts sweeps while no dispatcher leads (they stay queued).
        checks["dispatcher"] = "ok" if leader(db_session=session) else "none"
    if request.app.state.settings.embedded_dispatcher:
        import ray

        if not ray.is_initialized():
            return problem(503, "Not ready", "Ray is not connected")
        checks["ray"] = "ok"
    return {"status": "ok"} | checks
