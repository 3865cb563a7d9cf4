"""PostgreSQL: the lab's database. psycopg 3; ``SKIP LOCKED`` claims; a liveness check of
pooled connections that sat idle."""

from __future__ import annotations

import time
from functools import partial
from typing import Any

from sqlalchemy import Engine, Select, Table, create_engine, event
from sqlalchemy.dialects.postgresql import Insert, insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DisconnectionError

from services.dialects import Dialect


class PostgreSQL(Dialect):
    name = "postgresql"

    def create_engine(
        self, url: str, *, pool_size: int, max_overflow: int, idle_ping_s: float
    ) -> Engine:
        parsed = make_url(url)
        if parsed.drivername == "postgresql":
            url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
        engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow)
        event.listen(engine, "checkin", _checked_in)
        event.listen(engine, "checkout", partial(_ping_if_idle, engine.dialect, idle_ping_s))
        return engine

    def insert(self, table: Table) -> Insert:
        return insert(table)

    def claimable(self, query: Select[Any]) -> Select[Any]:
        return query.with_for_update(skip_locked=True)


def _checked_in(_dbapi_conn: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dialect: Any, idle_s: float, dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    """SQLAlchemy's pessimistic disconnect handling (``pool_pre_ping``), for connections idle
    more than ``idle_s`` only: one that was in use a moment ago is alive, and a round trip per
    checkout costs a busy ingestion path several percent. A dead connection raises
    DisconnectionError, so the pool replaces it and tries again."""
    last = record.info.get("checked_in_at")
    if last is not None and time.monotonic() - last < idle_s:
        return
    try:
        alive = dialect.do_ping(dbapi_conn)
    except Exception as exc:
        raise DisconnectionError("the pooled connection is gone") from exc
    if not alive:
        raise DisconnectionError("the pooled connection is gone")
