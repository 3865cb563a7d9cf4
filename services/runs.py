"""Run lifecycle: queries, guarded state transitions, claiming and cancellation.

``queued → running → succeeded | diverged | failed | cancelled``. Every transition is one
guarded UPDATE (``WHERE status = :expected``), so two processes racing on a run cannot both win.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, defer

from services.errors import Conflict, NotFound
from services.models import FINAL_STATUSES, Run, Sweep, User, utcnow


def get_sweep(*, db_session: Session, sweep_id: int) -> Sweep:
    sweep = db_session.get(Sweep, sweep_id)
    if sweep is None:
        raise NotFound(f"sweep {sweep_id} does not exist")
    return sweep


def owned_by(column: Any, owner: str) -> Any:
    """``column`` (an owner id) is the id of the user named ``owner``."""
    return column == select(User.id).where(User.name == owner).scalar_subquery()


def list_sweeps(
    *, db_session: Session, limit: int, offset: int, owner: str | None = None
) -> tuple[Sequence[Sweep], int]:
    query = select(Sweep)
    if owner is not None:
        query = query.where(owned_by(Sweep.owner_id, owner))
    total = db_session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db_session.scalars(query.order_by(Sweep.id.desc()).limit(limit).offset(offset))
    return rows.all(), total


def status_counts(*, db_session: Session, sweep_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """sweep id -> {status: number of its runs in it}, for many sweeps in one statement."""
    out: dict[int, dict[str, int]] = {sweep_id: {} for sweep_id in sweep_ids}
    rows = db_session.execute(
        select(Run.sweep_id, Run.status, func.count())
        .where(Run.sweep_id.in_(sweep_ids))
        .group_by(Run.sweep_id, Run.status)
    )
    for sweep_id, status, count in rows:
        out[sweep_id][status] = count  # type: ignore[index]  # not None: filtered by IN
    return out


def sweep_run_ids(*, db_session: Session, sweep_id: int) -> list[int]:
    return list(db_session.scalars(select(Run.id).where(Run.sweep_id == sweep_id).order_by(Run.id)))


def get_run(*, db_session: Session, run_id: int) -> Run:
    run = db_session.get(Run, run_id)
    if run is None:
        raise NotFound(f"run {run_id} does not exist")
    return run


def list_runs(
    *,
    db_session: Session,
    sweep_id: int | None = None,
    status: str | None = None,
    owner: str | None = None,
    external: bool | None = None,
    limit: int,
    offset: int,
    large: Collection[str] = ("config", "manifest"),
) -> tuple[Sequence[Run], int]:
    """Runs in id order; their ``config`` and ``manifest`` are loaded only if in ``large``."""
    deferred = [defer(getattr(Run, name)) for name in ("config", "manifest") if name not in large]
    query = select(Run).options(*deferred)
    if sweep_id is not None:
        query = query.where(Run.sweep_id == sweep_id)
    if status is not None:
        query = query.where(Run.status == status)
    if external is not None:
        query = query.where(Run.external.is_(external))
    if owner is not None:
        query = query.where(owned_by(Run.owner_id, owner))
    total = db_session.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db_session.scalars(query.order_by(Run.id).limit(limit).offset(offset))
    return rows.all(), total


def transition(*, db_session: Session, run_id: int, expected: str, new: str, **fields: Any) -> bool:
    """Move ``run_id`` from ``expected`` to ``new`` (and set ``fields``); False if not there."""
    values = {"status": new, **fields}
    if new in FINAL_STATUSES:
        values.setdefault("finished_at", utcnow())
    result = db_session.execute(
        update(Run)
        .where(Run.id == run_id, Run.status == expected)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def queued_runs(*, db_session: Session, limit: int) -> list[Run]:
    """The next ``limit`` queued runs of each owner not blocked (by priority, then oldest),
    their config and manifest not loaded: the dispatcher shares the slots between owners."""
    rank = func.row_number().over(partition_by=Run.owner_id, order_by=(Run.priority.desc(), Run.id))
    ranked = (
        select(Run.id, rank.label("rank"))
        .where(Run.status == "queued", Run.blocked_reason.is_(None))
        .subquery()
    )
    query = (
        select(Run)
        .join(ranked, ranked.c.id == Run.id)
        .where(ranked.c.rank <= limit)
        .order_by(Run.priority.desc(), Run.id)
        .options(defer(Run.config), defer(Run.manifest))
    )
    return list(db_session.scalars(query))


def running_by_owner(*, db_session: Session) -> dict[int | None, int]:
    """How many cluster runs each owner has running."""
    rows = db_session.execute(
        select(Run.owner_id, func.count())
        .where(Run.status == "running", Run.external.is_(False))
        .group_by(Run.owner_id)
    )
    return {owner: count for owner, count in rows}


def block_run(*, db_session: Session, run_id: int, reason: str) -> None:
    """Mark a queued run as fitting on no node (it waits until the nodes change)."""
    db_session.execute(
        update(Run).where(Run.id == run_id, Run.status == "queued").values(blocked_reason=reason)
    )


def unblock_runs(*, db_session: Session) -> None:
    """Consider every blocked queued run again (the cluster's nodes changed)."""
    db_session.execute(
        update(Run)
        .where(Run.status == "queued", Run.blocked_reason.is_not(None))
        .values(blocked_reason=None)
    )


def claim_runs(*, db_session: Session, run_ids: Sequence[int]) -> list[Run]:
    """Mark the given queued runs ``running`` (attempt + 1); returns those that were claimed.

    The guarded UPDATE makes a race safe: of two dispatchers claiming one run, one wins.
    """
    now = utcnow()
    claimed = [
        run_id
        for run_id in run_ids
        if transition(
            db_session=db_session,
            run_id=run_id,
            expected="queued",
            new="running",
            attempt=Run.attempt + 1,
            started_at=now,
            heartbeat_at=now,
            cancel_requested=False,
        )
    ]
    # populate_existing: the caller may hold these rows from before the UPDATE (identity map).
    query = select(Run).where(Run.id.in_(claimed)).order_by(Run.id)
    return list(db_session.scalars(query.execution_options(populate_existing=True)))


def claim_queued_runs(*, db_session: Session, limit: int) -> list[Run]:
    """Claim up to ``limit`` queued runs, oldest first (PostgreSQL: SKIP LOCKED candidates)."""
    if limit <= 0:
        return []
    query = select(Run.id).where(Run.status == "queued").order_by(Run.id).limit(limit)
    if db_session.get_bind().dialect.name == "postgresql":
        query = query.with_for_update(skip_locked=True)
    return claim_runs(db_session=db_session, run_ids=list(db_session.scalars(query)))


def request_cancel(*, db_session: Session, run_id: int) -> Run:
    """Cancel a queued run at once; flag a running one for the dispatcher to stop."""
    run = get_run(db_session=db_session, run_id=run_id)
    if run.status in FINAL_STATUSES:
        raise Conflict(f"run {run_id} is already {run.status}")
    if not transition(
        db_session=db_session,
        run_id=run_id,
        expected="queued",
        new="cancelled",
        error="cancelled before it started",
    ):
        db_session.execute(
            update(Run)
            .where(Run.id == run_id, Run.status == "running")
            .values(cancel_requested=True)
        )
    db_session.flush()
    db_session.refresh(run)
    return run


def cancel_requested_ids(*, db_session: Session, run_ids: Sequence[int]) -> set[int]:
    if not run_ids:
        return set()
    rows = db_session.scalars(
        select(Run.id).where(Run.id.in_(run_ids), Run.cancel_requested.is_(True))
    )
    return set(rows)
