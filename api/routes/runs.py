"""Runs: get, list (by sweep and status), cancel. Metrics: routes/metrics.py; REST-created runs:
routes/external_runs.py."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.auth import CurrentUser
from api.deps import Offset, RunId, SessionDep, SweepId
from api.problems import problem_responses
from api.schemas import RunListed, RunPublic, RunsPublic, RunStatus
from services import runs as run_service
from services.users import audit, check_owner

router = APIRouter(prefix="/runs", tags=["runs"])

Field = Literal["config", "manifest"]
LARGE = ("config", "manifest")


@router.get("", response_model=RunsPublic, response_model_exclude_none=False)
def list_(
    db: SessionDep,
    sweep_id: Annotated[SweepId | None, Query()] = None,
    status: RunStatus | None = None,
    owner: Annotated[str | None, Query(max_length=64, description="a user's name")] = None,
    fields: Annotated[
        list[Field] | None, Query(description="also return these (repeatable)")
    ] = None,
    external: Annotated[
        bool | None, Query(description="only external runs (true) or only the cluster's (false)")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
) -> RunsPublic:
    """Runs in id order, optionally of one sweep, in one state, external or not; without their
    config and manifest unless ``fields`` asks for them."""
    wanted = set(fields or ())
    runs, count = run_service.list_runs(
        db_session=db,
        sweep_id=sweep_id,
        status=status,
        owner=owner,
        external=external,
        limit=limit,
        offset=offset,
        large=wanted,
    )
    names = [name for name in RunListed.model_fields if name not in LARGE or name in wanted]
    data = [RunListed.model_validate({name: getattr(run, name) for name in names}) for run in runs]
    return RunsPublic(data=data, count=count)


@router.get("/{run_id}", response_model=RunPublic)
def get(run_id: RunId, db: SessionDep) -> RunPublic:
    """A run: config, state, attempt, error, summary and reproducibility manifest."""
    return RunPublic.model_validate(run_service.get_run(db_session=db, run_id=run_id))


@router.post("/{run_id}/cancel", response_model=RunPublic, responses=problem_responses(409))
def cancel(run_id: RunId, db: SessionDep, user: CurrentUser) -> RunPublic:
    """Cancel a queued run now, or ask the dispatcher to stop a running one."""
    owner = run_service.get_run(db_session=db, run_id=run_id).owner_id
    check_owner(user, owner, f"run {run_id}")
    run = run_service.request_cancel(db_session=db, run_id=run_id)
    audit(db_session=db, user=user, action="cancel_run", target=f"run:{run_id}")
    return RunPublic.model_validate(run)
