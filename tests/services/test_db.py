"""The engine's disconnect handling on a real PostgreSQL: a pooled connection whose server
process died is replaced at checkout once it has been idle, as with ``pool_pre_ping``."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from services.db import make_engine


def kill_pooled_backend(url: str, idle_ping_s: float) -> int:
    """Leave one connection in the pool whose server process is then terminated."""
    engine = make_engine(url, idle_ping_s=idle_ping_s)
    with engine.connect() as conn:
        pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    killer = make_engine(url)
    with killer.connect() as conn:
        conn.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
        conn.commit()
    killer.dispose()
    time.sleep(0.2)
    with engine.connect() as conn:  # the same pooled connection, unless it was replaced
        new_pid = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
    engine.dispose()
    assert new_pid != pid
    return int(new_pid)


@pytest.mark.postgres
def test_a_dead_idle_connection_is_replaced_at_checkout(pg_migrated_url: str) -> None:
    kill_pooled_backend(pg_migrated_url, idle_ping_s=0.05)


@pytest.mark.postgres
def test_without_the_check_the_dead_connection_fails_its_first_query(pg_migrated_url: str) -> None:
    """The control: the same scenario with the check off (idle time below the threshold)."""
    with pytest.raises(OperationalError):
        kill_pooled_backend(pg_migrated_url, idle_ping_s=3600)
