"""Idempotency keys for the creating POSTs (sweeps, external runs, datasets).

A client that retries after a timeout sends the same ``Idempotency-Key`` header again and gets
the same answer, not a second sweep. The key is claimed in the creating request's own
transaction (a row of ``idempotency_key``, with a hash of the request) and its answer stored
there before the commit, so a key and what it created commit together or not at all. A
concurrent request with the same key waits for the first one's commit (PostgreSQL: the key's
unique index; SQLite: its single writer) and then replays its answer. The same key with another
body is a 422; keys older than ``idempotency_ttl_s`` are forgotten.
"""

from __future__ import annotations

import hashlib
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from services.dialects import dialect_of
from services.errors import FieldError, SpecError
from services.models import IdempotencyKey, utcnow


class Replay(Exception):
    """The key's request was answered before: send this answer again."""

    def __init__(self, status: int, body: Any) -> None:
        self.status = status
        self.body = body


def claim(
    *, db_session: Session, scope: str, key: str | None, request: bytes, ttl_s: float
) -> None:
    """Claim ``key`` for this request (in the caller's transaction), or raise :class:`Replay`
    with the stored answer of the same request, or SpecError for another request's key.

    ``scope`` names the route (and, with users, the user); ``request`` is what identifies the
    request's content (its canonical body).
    """
    if key is None:
        return
    digest = hashlib.sha256(request).hexdigest()
    now = utcnow()
    table = IdempotencyKey.__table__
    db_session.execute(
        delete(IdempotencyKey).where(IdempotencyKey.created_at < now - timedelta(seconds=ttl_s))
    )
    inserted = db_session.execute(
        dialect_of(db_session)
        .insert(table)  # type: ignore[arg-type]
        .values(scope=scope, key=key, request_sha256=digest, created_at=now)
        .on_conflict_do_nothing(index_elements=["scope", "key"])
        .returning(table.c.key)
    ).first()
    if inserted is not None:
        return
    found = db_session.execute(
        select(IdempotencyKey.request_sha256, IdempotencyKey.status, IdempotencyKey.response).where(
            IdempotencyKey.scope == scope, IdempotencyKey.key == key
        )
    ).one()
    if found.request_sha256 != digest:
        reason = "was used with another request: a new request needs a new key"
        raise SpecError([FieldError("Idempotency-Key", key, reason)])
    raise Replay(found.status, found.response)


def remember(
    *, db_session: Session, scope: str, key: str | None, status: int, response: Any
) -> None:
    """Store the answer to a claimed key (in the transaction that created what it names)."""
    if key is None:
        return
    db_session.execute(
        update(IdempotencyKey)
        .where(IdempotencyKey.scope == scope, IdempotencyKey.key == key)
        .values(status=status, response=response)
        .execution_options(synchronize_session=False)
    )
