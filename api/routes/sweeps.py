"""Sweeps: create (expanded into queued runs in one transaction), get, list."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, BackgroundTasks, Query, Request, Response, status

from api.auth import CurrentUser, limited
from api.deps import (
    IdempotencyKeyHeader,
    Offset,
    SessionDep,
    SettingsDep,
    SweepId,
    canonical,
    once,
    wake_dispatcher,
)
from api.schemas import PlannedRunPublic, SweepCreated, SweepPlan, SweepPublic, SweepsPublic
from services import runs as run_service
from services.sweeps import SweepSpec, create_sweep, plan_sweep
from services.users import audit

router = APIRouter(prefix="/sweeps", tags=["sweeps"])


@router.post(
    "",
    status_code=status.HTTP_201_CREATED,
    response_model=None,
    responses={
        201: {"model": SweepCreated, "description": "the sweep and its runs, queued"},
        200: {"model": SweepPlan, "description": "dry_run: the runs it expands to, not stored"},
    },
)
def create(
    spec: SweepSpec,
    db: SessionDep,
    settings: SettingsDep,
    request: Request,
    background: BackgroundTasks,
    response: Response,
    user: CurrentUser,
    key: IdempotencyKeyHeader = None,
    dry_run: Annotated[
        bool, Query(description="validate and expand only: 200 with the runs, nothing stored")
    ] = False,
) -> SweepCreated | SweepPlan:
    """Validate a sweep spec, expand its grid and queue every run (``dry_run``: only show the
    runs it expands to)."""
    if dry_run:
        response.status_code = status.HTTP_200_OK
        planned = plan_sweep(db_session=db, spec=spec, settings=settings)
        runs = [
            PlannedRunPublic(
                index=i,
                overrides=p.overrides,
                config=p.config.model_dump(mode="json"),
                resources=p.resources,
            )
            for i, p in enumerate(planned)
        ]
        return SweepPlan(name=spec.name, run_count=len(runs), runs=runs)

    def created() -> SweepCreated:
        sweep = create_sweep(db_session=db, spec=spec, settings=settings, owner_id=user.id)
        limited(db, user, "max_active_runs", sweep.run_count, settings)
        audit(db_session=db, user=user, action="create_sweep", target=f"sweep:{sweep.id}")
        run_ids = run_service.sweep_run_ids(db_session=db, sweep_id=sweep.id)
        return SweepCreated(
            id=sweep.id, name=sweep.name, run_count=sweep.run_count, run_ids=run_ids
        )

    answer = once(db, request, user.id, key, canonical(spec), created)
    background.add_task(wake_dispatcher, request)  # runs after the answer, so after the commit
    return answer


@router.get("", response_model=SweepsPublic)
def list_(
    db: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Offset = 0,
    owner: Annotated[str | None, Query(max_length=64, description="a user's name")] = None,
) -> SweepsPublic:
    """Sweeps, newest first, with the number of their runs in each state."""
    sweeps, count = run_service.list_sweeps(db_session=db, limit=limit, offset=offset, owner=owner)
    counts = run_service.status_counts(db_session=db, sweep_ids=[s.id for s in sweeps])
    data = [
        SweepPublic.model_validate(s).model_copy(update={"status_counts": counts[s.id]})
        for s in sweeps
    ]
    return SweepsPublic(data=data, count=count)


@router.get("/{sweep_id}", response_model=SweepPublic)
def get(sweep_id: SweepId, db: SessionDep) -> SweepPublic:
    """One sweep with the number of its runs in each state."""
    sweep = run_service.get_sweep(db_session=db, sweep_id=sweep_id)
    counts = run_service.status_counts(db_session=db, sweep_ids=[sweep_id])[sweep_id]
    return SweepPublic.model_validate(sweep).model_copy(update={"status_counts": counts})
