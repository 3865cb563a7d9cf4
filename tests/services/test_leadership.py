"""Exactly one leader through a PostgreSQL advisory lock; the standby takes over when it goes."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from services.db import make_engine
from services.leadership import Leadership

pytestmark = pytest.mark.postgres


def test_one_leader_and_takeover(pg_empty_url: str) -> None:
    first_engine, second_engine = make_engine(pg_empty_url), make_engine(pg_empty_url)
    first, second = Leadership(first_engine), Leadership(second_engine)
    assert first.try_acquire()
    assert not second.try_acquire(), "a second dispatcher must wait"
    assert first.still_held()
    # The leader's session ends, as when its process dies (the server closes it).
    with second_engine.connect() as conn:
        killed = conn.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_locks"
                " WHERE locktype = 'advisory' AND pid <> pg_backend_pid() AND database ="
                " (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        ).all()
    assert killed
    assert not first.still_held()
    assert second.try_acquire(), "the standby takes over once the lock is free"
    second.release()
    assert first.try_acquire()
    first.release()
    first_engine.dispose()
    second_engine.dispose()


def test_sqlite_needs_no_lock(tmp_path) -> None:  # type: ignore[no-untyped-def]
    leadership = Leadership(make_engine(f"sqlite:///{tmp_path / 'x.db'}"))
    assert leadership.try_acquire() and leadership.still_held()
