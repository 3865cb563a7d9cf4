"""Engines and sessions. SQLite connections get WAL, foreign keys, busy timeout, NORMAL sync."""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, make_url
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.orm import Session, sessionmaker


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def make_engine(
    url: str, idle_ping_s: float = 1.0, pool_size: int = 20, max_overflow: int = 20
) -> Engine:
    """An engine for ``url``; creates the SQLite file's directory; PostgreSQL via psycopg 3,
    with a liveness check of connections idle for more than ``idle_ping_s`` seconds."""
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database and parsed.database != ":memory:":
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    if parsed.drivername == "postgresql":
        url = parsed.set(drivername="postgresql+psycopg").render_as_string(hide_password=False)
    # The pool is sized with FastAPI's 40-thread pool in mind (PITFALLS.md).
    engine = create_engine(url, pool_size=pool_size, max_overflow=max_overflow)
    event.listen(engine, "checkin", _checked_in)
    event.listen(engine, "checkout", partial(_ping_if_idle, engine.dialect, idle_ping_s))
    return engine


_side_engines: weakref.WeakKeyDictionary[Engine, Engine] = weakref.WeakKeyDictionary()
_side_lock = threading.Lock()


def side_engine(engine: Engine) -> Engine:
    """A small second pool on ``engine``'s database, for work a holder of one of ``engine``'s
    connections starts on the side (moving queued metric batches, merging rollups before a
    read). Drawing that second connection from the same pool could exhaust it: every one of
    40 request threads holding one connection and waiting for another. Side connections never
    wait for the main pool, so the wait is always bounded."""
    with _side_lock:
        side = _side_engines.get(engine)
        if side is None:
            url = engine.url.render_as_string(hide_password=False)
            side = _side_engines[engine] = make_engine(url, pool_size=2, max_overflow=8)
        return side


def dispose(engine: Engine) -> None:
    """Close ``engine``'s pooled connections and those of its side pool, if it has one."""
    with _side_lock:
        side = _side_engines.pop(engine, None)
    if side is not None:
        side.dispose()
    engine.dispose()


def _checked_in(_dbapi_conn: Any, record: Any) -> None:
    record.info["checked_in_at"] = time.monotonic()


def _ping_if_idle(dialect: Any, idle_s: float, dbapi_conn: Any, record: Any, _proxy: Any) -> None:
    """SQLAlchemy's pessimistic disconnect handling (``pool_pre_ping``), for connections idle
    more than ``idle_s`` only: one that was in use a moment ago is alive, and a round trip per
    checkout cost a busy ingestion path several percent. A dead connection raises
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


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with factory() as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def array_literal(values: Iterable[int | float | None]) -> str:
    """A PostgreSQL array literal of numbers (None is NULL), for a ``%s::type[]`` parameter:
    passed as text, it costs psycopg far less than a list. ``repr`` of a float reads back
    exactly; ``inf`` and ``-inf`` are valid float8 input."""
    return "{" + ",".join("NULL" if v is None else repr(v) for v in values) + "}"


def driver_connection(db_session: Session) -> Any:
    """The DBAPI connection (psycopg or sqlite3) under the session's transaction, for the hot
    paths where building SQLAlchemy statements and rows costs more than the query."""
    raw = db_session.connection().connection.driver_connection
    assert raw is not None
    return raw
