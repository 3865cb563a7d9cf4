"""Runs created over REST: external runs that a training script logs to, or one queued run.

POST /runs {"config": {...}, "external": true}   -> 201, a running external run
POST /runs/{id}/metrics {"points": [...]}          -> log batches (routes/metrics.py)
POST /runs/{id}/finish {"status": "succeeded"}    -> its final state
"""

from __future__ import annotations

from fastapi import APIRouter, status

from api.deps import RunId, SessionDep, SettingsDep
from api.problems import problem_responses
from api.schemas import RunPublic
from services.external_runs import RunCreate, RunFinish, create_run, finish_run

router = APIRouter(prefix="/runs", tags=["runs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunPublic)
def create(body: RunCreate, db: SessionDep, settings: SettingsDep) -> RunPublic:
    """Create an external run (running at once, logged to over REST) or queue one run."""
    return RunPublic.model_validate(create_run(db_session=db, body=body, settings=settings))


@router.post("/{run_id}/finish", response_model=RunPublic, responses=problem_responses(409))
def finish(run_id: RunId, body: RunFinish, db: SessionDep, settings: SettingsDep) -> RunPublic:
    """Finish an external run: its final status, and optionally an error and a summary."""
    run = finish_run(db_session=db, run_id=run_id, body=body, settings=settings)
    return RunPublic.model_validate(run)
