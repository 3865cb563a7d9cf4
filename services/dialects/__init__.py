"""Dialect-specific SQL behind one small interface, chosen once from the engine (the shape of
Prefect's ``query_components``): one module per database, everything else dialect-neutral.

- :class:`Dialect.create_engine`: connection set-up (SQLite pragmas; PostgreSQL's pool ping).
- :meth:`Dialect.insert`: an ``INSERT`` that supports ``on_conflict_do_nothing``.
- :meth:`Dialect.claimable`: the row lock a claim of queued runs takes (``SKIP LOCKED``).
- :meth:`Dialect.service_lock`: one embedded service per SQLite file.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from sqlalchemy import Connection, Engine, Select, Table
from sqlalchemy.dialects.postgresql import Insert as PgInsert
from sqlalchemy.dialects.sqlite import Insert as SqliteInsert
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session


class Dialect(ABC):
    name: str

    @abstractmethod
    def create_engine(
        self, url: str, *, pool_size: int, max_overflow: int, idle_ping_s: float
    ) -> Engine:
        """An engine for ``url`` with this database's connection set-up; pooled connections
        idle for more than ``idle_ping_s`` seconds are checked before use where that matters."""

    @abstractmethod
    def insert(self, table: Table) -> PgInsert | SqliteInsert:
        """``INSERT INTO table`` with ``on_conflict_do_nothing`` available."""

    def claimable(self, query: Select[Any]) -> Select[Any]:
        """``query`` locking the rows it returns against other claimers, if the database can."""
        return query

    def service_lock(self, url: str) -> AbstractContextManager[None]:
        """Held while an embedded service (API + dispatcher) runs on ``url``; raises
        :class:`ServiceRunning` if another one holds it. PostgreSQL needs none: several
        dispatchers may run there, one leads."""
        return nullcontext()


class ServiceRunning(RuntimeError):
    """Another service already runs on this database."""


def dialect_for_url(url: str) -> Dialect:
    return _by_name(make_url(url).get_backend_name())


def dialect_of(bind: Engine | Connection | Session) -> Dialect:
    engine = bind.get_bind() if isinstance(bind, Session) else bind
    return _by_name(engine.dialect.name)


def _by_name(name: str) -> Dialect:
    if name == "postgresql":
        from services.dialects.postgresql import PostgreSQL

        return PostgreSQL()
    if name == "sqlite":
        from services.dialects.sqlite import SQLite

        return SQLite()
    raise ValueError(f"unsupported database: {name} (overparam runs on SQLite or PostgreSQL)")
