"""Runs: get, list (by sweep and status), cancel. Metrics: routes/metrics.py; REST-created runs:
routes/external_runs.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import SessionDep
from api.schemas import RunPublic, RunsPublic, RunStatus
from services import runs as run_service

router = APIRouter(prefix="/runs", tags=["runs"])


@router.get("", response_model=RunsPublic)
def list_(
    db: SessionDep,
    sweep_id: int | None = None,
    status: RunStatus | None = None,
    external: Annotated[
        bool | None, Query(description="only external runs (true) or only the cluster's (false)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> RunsPublic:
    """Runs in id order, optionally of one sweep, in one state, external or not."""
    runs, count = run_service.list_runs(
        db_session=db,
        sweep_id=sweep_id,
        status=status,
        external=external,
        limit=limit,
        offset=offset,
    )
    return RunsPublic(data=[RunPublic.model_validate(r) for r in runs], count=count)


@router.get("/{run_id}", response_model=RunPublic)
def get(run_id: int, db: SessionDep) -> RunPublic:
    """A run: config, state, attempt, error, summary and reproducibility manifest."""
    return RunPublic.model_validate(run_service.get_run(db_session=db, run_id=run_id))


@router.post("/{run_id}/cancel", response_model=RunPublic)
def cancel(run_id: int, db: SessionDep) -> RunPublic:
    """Cancel a queued run now, or ask the dispatcher to stop a running one."""
    return RunPublic.model_validate(run_service.request_cancel(db_session=db, run_id=run_id))
