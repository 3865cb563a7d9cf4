"""Engines and sessions. Connection set-up per database lives in ``services/dialects``."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from services.dialects import dialect_for_url


def make_engine(
    url: str, idle_ping_s: float = 1.0, pool_size: int = 20, max_overflow: int = 20
) -> Engine:
    """An engine for ``url`` (SQLite or PostgreSQL, see ``services/dialects``).

    The pool is sized with FastAPI's 40-thread pool in mind (PITFALLS.md).
    """
    return dialect_for_url(url).create_engine(
        url, pool_size=pool_size, max_overflow=max_overflow, idle_ping_s=idle_ping_s
    )


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
