"""SQLite: the embedded default. WAL, foreign keys and a busy timeout on every connection."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Table, create_engine, event
from sqlalchemy.dialects.sqlite import Insert, insert
from sqlalchemy.engine import make_url

from services.dialects import Dialect, ServiceRunning


def _pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


class SQLite(Dialect):
    name = "sqlite"

    def create_engine(
        self, url: str, *, pool_size: int, max_overflow: int, idle_ping_s: float
    ) -> Engine:
        database = make_url(url).database
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            url,
            connect_args={"check_same_thread": False, "timeout": 30},
            pool_size=pool_size,
            max_overflow=max_overflow,
        )
        event.listen(engine, "connect", _pragmas)
        return engine

    def insert(self, table: Table) -> Insert:
        return insert(table)

    @contextmanager
    def service_lock(self, url: str) -> Iterator[None]:
        """An exclusive lock on ``<database>.lock`` (``flock``: the kernel drops it when the
        process dies, however it dies), holding the holder's pid for the message."""
        database = make_url(url).database
        if not database or database == ":memory:":
            yield
            return
        path = Path(f"{database}.lock")
        with path.open("a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                lock.seek(0)
                holder = lock.read().strip() or "?"
                raise ServiceRunning(
                    f"another overparam service (pid {holder}) is running on {database}; "
                    "stop it first (or point this one at another OVERPARAM_DATA_DIR)"
                ) from None
            lock.seek(0)
            lock.truncate()
            lock.write(str(os.getpid()))
            lock.flush()
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
