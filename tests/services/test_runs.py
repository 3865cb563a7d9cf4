"""Run lifecycle on a real database: guarded transitions, claiming, cancellation."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session

from services.db import make_engine, make_sessionmaker, session_scope
from services.errors import Conflict
from services.models import Run
from services.runs import claim_queued_runs, claim_runs, queued_runs, request_cancel, transition
from services.settings import Settings
from services.sweeps import SweepSpec, create_sweep


@pytest.fixture
def sessions(db_url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(db_url)
    yield make_sessionmaker(engine)
    engine.dispose()


def make_sweep(db: Session, runs: int) -> list[int]:
    settings = Settings(database_url="sqlite://", embedded_dispatcher=False)
    sweep = create_sweep(
        db_session=db, spec=SweepSpec(grid={"seed": list(range(runs))}), settings=settings
    )
    return [r.id for r in db.query(Run).filter(Run.sweep_id == sweep.id).order_by(Run.id)]


def test_claim_takes_oldest_first_up_to_the_limit_and_counts_attempts(sessions) -> None:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as db:
        ids = make_sweep(db, 5)
    with session_scope(sessions) as db:
        claimed = claim_queued_runs(db_session=db, limit=3)
        assert [r.id for r in claimed] == ids[:3]
        assert all(r.status == "running" and r.attempt == 1 and r.started_at for r in claimed)
    with session_scope(sessions) as db:
        assert [r.id for r in claim_queued_runs(db_session=db, limit=10)] == ids[3:]
        assert claim_queued_runs(db_session=db, limit=10) == []


def test_claimed_runs_are_returned_as_updated_even_if_loaded_before(sessions) -> None:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as db:
        ids = make_sweep(db, 2)
    with session_scope(sessions) as db:
        loaded = queued_runs(db_session=db, limit=10)
        assert [r.attempt for r in loaded] == [0, 0]
        claimed = claim_runs(db_session=db, run_ids=ids)
        assert [(r.status, r.attempt) for r in claimed] == [("running", 1), ("running", 1)]


def test_transition_is_guarded(sessions) -> None:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as db:
        (run_id,) = make_sweep(db, 1)
    with session_scope(sessions) as db:
        assert not transition(db_session=db, run_id=run_id, expected="running", new="succeeded")
        assert transition(db_session=db, run_id=run_id, expected="queued", new="running")
        assert transition(db_session=db, run_id=run_id, expected="running", new="failed", error="x")
        # a second writer that still believes the run is running loses
        assert not transition(db_session=db, run_id=run_id, expected="running", new="succeeded")
    with session_scope(sessions) as db:
        run = db.get(Run, run_id)
        assert run is not None and run.status == "failed" and run.finished_at is not None


def test_cancel_queued_is_immediate_running_is_flagged_final_is_conflict(sessions) -> None:  # type: ignore[no-untyped-def]
    with session_scope(sessions) as db:
        a, b = make_sweep(db, 2)
    with session_scope(sessions) as db:
        claim_queued_runs(db_session=db, limit=1)  # a is running now
        assert request_cancel(db_session=db, run_id=b).status == "cancelled"
        flagged = request_cancel(db_session=db, run_id=a)
        assert flagged.status == "running" and flagged.cancel_requested
        with pytest.raises(Conflict):
            request_cancel(db_session=db, run_id=b)


def test_runs_that_fit_no_node_are_blocked_and_never_hold_up_the_queue(sessions) -> None:  # type: ignore[no-untyped-def]
    """70 runs asking for 4 GPUs, queued before 3 small ones, on a cluster without GPUs: the
    small ones start; the big ones say why they wait, and start once a GPU node joins."""
    from services.dispatcher import Dispatcher

    settings = Settings(database_url="sqlite://", embedded_dispatcher=False)
    with session_scope(sessions) as db:
        big = create_sweep(
            db_session=db,
            spec=SweepSpec(grid={"seed": list(range(70))}, resources={"gpus": 4}),
            settings=settings,
        ).id
        small = make_sweep(db, 3)
    dispatcher = Dispatcher(settings, sessions, submit=lambda launch: None)
    cpu_node = [{"CPU": 2.0, "GPU": 0.0, "memory": 8e9}]
    free = dict(cpu_node[0])
    claimed = dispatcher._claim(free, 2, cpu_node) + dispatcher._claim(free, 2, cpu_node)
    assert [run.id for run in claimed] == small[:2]
    with session_scope(sessions) as db:
        blocked = db.query(Run).filter(Run.sweep_id == big).all()
        assert all(r.status == "queued" and "4 GPU" in (r.blocked_reason or "") for r in blocked)
    gpu_node = [*cpu_node, {"CPU": 8.0, "GPU": 4.0, "memory": 64e9}]
    claimed = dispatcher._claim(gpu_node[1], 1, gpu_node)
    with session_scope(sessions) as db:
        assert [r.sweep_id for r in db.query(Run).filter(Run.id == claimed[0].id)] == [big]
        assert db.query(Run).filter(Run.blocked_reason.is_not(None)).count() == 0


def test_a_big_sweep_does_not_starve_a_colleagues_small_one(sessions) -> None:  # type: ignore[no-untyped-def]
    """User A queues 200 runs, then user B 3: B's runs start within the next free slots, and
    A's higher-priority sweep goes before A's older one."""
    from services.dispatcher import Dispatcher
    from services.users import create_user

    settings = Settings(database_url="sqlite://", embedded_dispatcher=False)
    with session_scope(sessions) as db:
        a = create_user(db_session=db, name="a", role="member")[0].id
        b = create_user(db_session=db, name="b", role="member")[0].id

        def sweep(owner: int, runs: int, priority: int = 0) -> list[int]:
            spec = SweepSpec(grid={"seed": list(range(runs))}, priority=priority)
            made = create_sweep(db_session=db, spec=spec, settings=settings, owner_id=owner)
            return [r.id for r in db.query(Run).filter(Run.sweep_id == made.id).order_by(Run.id)]

        big = sweep(a, 200)
        small = sweep(b, 3)
        urgent = sweep(a, 2, priority=5)
    dispatcher = Dispatcher(settings, sessions, submit=lambda launch: None)
    node = [{"CPU": 64.0, "GPU": 0.0, "memory": 1e12}]
    started: list[int] = []
    for _ in range(4):  # four ticks, two free slots each
        started += [run.id for run in dispatcher._claim(dict(node[0]), 2, node)]
    assert set(small) <= set(started[:6]), started
    assert started.index(urgent[0]) < started.index(big[0])
    assert len(started) == 8
