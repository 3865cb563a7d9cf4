"""Runs created over REST: external runs that a training script logs to, or one queued run.

POST /runs {"config": {...}, "external": true}   -> 201, a running external run
POST /runs/{id}/metrics {"points": [...]}          -> log batches (routes/metrics.py)
POST /runs/{id}/finish {"status": "succeeded"}    -> its final state
"""

from __future__ import annotations

from fastapi import APIRouter, BackgroundTasks, Request, status

from api.auth import CurrentUser, limited
from api.deps import (
    IdempotencyKeyHeader,
    RunId,
    SessionDep,
    SettingsDep,
    canonical,
    once,
    wake_dispatcher,
)
from api.problems import problem_responses
from api.schemas import RunPublic
from services.external_runs import RunCreate, RunFinish, create_run, finish_run
from services.runs import get_run
from services.users import audit, check_owner

router = APIRouter(prefix="/runs", tags=["runs"])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=RunPublic)
def create(
    body: RunCreate,
    db: SessionDep,
    settings: SettingsDep,
    request: Request,
    background: BackgroundTasks,
    user: CurrentUser,
    key: IdempotencyKeyHeader = None,
) -> RunPublic:
    """Create an external run (running at once, logged to over REST) or queue one run."""

    def created() -> RunPublic:
        run = create_run(db_session=db, body=body, settings=settings, owner_id=user.id)
        limited(db, user, "max_active_runs", 1, settings)
        audit(db_session=db, user=user, action="create_run", target=f"run:{run.id}")
        return RunPublic.model_validate(run)

    answer = once(db, request, user.id, key, canonical(body), created)
    if not body.external:
        background.add_task(wake_dispatcher, request)
    return answer


@router.post("/{run_id}/finish", response_model=RunPublic, responses=problem_responses(409))
def finish(
    run_id: RunId, body: RunFinish, db: SessionDep, settings: SettingsDep, user: CurrentUser
) -> RunPublic:
    """Finish an external run: its final status, and optionally an error and a summary."""
    owner = get_run(db_session=db, run_id=run_id).owner_id
    check_owner(user, owner, f"run {run_id}")
    run = finish_run(db_session=db, run_id=run_id, body=body, settings=settings)
    audit(db_session=db, user=user, action="finish_run", target=f"run:{run_id}", status=body.status)
    return RunPublic.model_validate(run)
