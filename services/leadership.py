"""Exactly one active dispatcher: a PostgreSQL session-level advisory lock.

The leader holds ``pg_try_advisory_lock(KEY)`` on a connection it keeps open; when its process
dies the server closes the connection and releases the lock, and a standby polling
``try_acquire`` takes over. Because Ray tasks share fate with their driver, the old leader's
runs died with it, so the new leader may safely re-queue every run left ``running``.
SQLite has no such lock: the embedded service is one process with one dispatcher.
"""

from __future__ import annotations

import logging

from sqlalchemy import Connection, Engine, select, text
from sqlalchemy.sql import func

log = logging.getLogger(__name__)

# An arbitrary, fixed 64-bit key naming "the overparam dispatcher" in pg_locks.
LOCK_KEY = 0x6F76_6572_7061_7261
MASK = 0xFFFF_FFFF
# pg_locks shows a bigint advisory key as classid (high 32 bits) and objid (low 32 bits).
HOLDS_LOCK = text(
    "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND granted"
    " AND pid = pg_backend_pid() AND classid::bigint = :hi AND objid::bigint = :lo)"
)


class Leadership:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.uses_lock = engine.dialect.name == "postgresql"
        self._conn: Connection | None = None

    def try_acquire(self) -> bool:
        """Take the lock if it is free; True when this process is (now) the leader."""
        if not self.uses_lock:
            return True
        if self._conn is not None:
            return True
        conn = self.engine.connect()
        try:
            got = bool(conn.execute(select(func.pg_try_advisory_lock(LOCK_KEY))).scalar())
            conn.commit()
        except Exception:
            conn.close()
            raise
        if got:
            self._conn = conn
        else:
            conn.close()
        return got

    def still_held(self) -> bool:
        """False once the lock's connection is gone (then this process must stop dispatching)."""
        if not self.uses_lock:
            return True
        if self._conn is None:
            return False
        try:
            # Ask the server, not the client: a silently re-established connection holds nothing.
            held = self._conn.execute(HOLDS_LOCK, {"hi": LOCK_KEY >> 32, "lo": LOCK_KEY & MASK})
            self._conn.commit()
            if held.scalar():
                return True
            log.error("the dispatcher lock is no longer held by this session")
            self._conn.close()
            self._conn = None
            return False
        except Exception:
            log.exception("lost the dispatcher lock's connection")
            self._conn = None
            return False

    def release(self) -> None:
        if self._conn is None:
            return
        try:
            self._conn.execute(select(func.pg_advisory_unlock(LOCK_KEY)))
            self._conn.commit()
        finally:
            self._conn.close()
            self._conn = None
