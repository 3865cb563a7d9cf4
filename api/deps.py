"""Typed dependencies: a route's signature lists what it needs.

``SessionDep`` is the one database session of a request. Its scope is the route function's
(``scope="function"``): the transaction commits, or rolls back, when the route returns and
before the response is sent, so no answer ever precedes its commit (FastAPI's default would
commit after the response). The commit runs on threads of its own (``app.state.commits``), not
on the request threads: a request that holds SQLite's write lock can always commit, even while
every request thread waits for that lock.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Annotated, TypeVar

from anyio import CancelScope, to_thread
from fastapi import Depends, Header, Path, Query, Request
from pydantic import BaseModel
from sqlalchemy.orm import Session

from services import idempotency
from services.settings import Settings

MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_db(request: Request) -> AsyncIterator[Session]:
    session = request.app.state.sessions()
    try:
        yield session
    except BaseException:
        with CancelScope(shield=True):  # a client that went away must not leave it open
            await to_thread.run_sync(_end, session, False, limiter=request.app.state.commits)
        raise
    await to_thread.run_sync(_end, session, True, limiter=request.app.state.commits)


def _end(session: Session, commit: bool) -> None:
    try:
        if commit:
            session.commit()
        else:
            session.rollback()
    finally:
        session.close()


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[Session, Depends(get_db, scope="function")]
RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="a run's id")]
SweepId = Annotated[int, Path(ge=1, le=MAX_ID, description="a sweep's id")]
DatasetId = Annotated[int, Path(ge=1, le=MAX_ID, description="a dataset's id")]
Offset = Annotated[int, Query(ge=0, le=MAX_ID, description="items to skip")]


async def wake_dispatcher(request: Request) -> None:
    """Tell this process's dispatcher, if it has one, that runs were queued (a background task
    of the route: it runs once the answer, and so the commit, is out)."""
    dispatcher = getattr(request.app.state, "dispatcher", None)
    if dispatcher is not None:
        dispatcher.wake()


IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="retry-safe creation: the same key and body get the same answer again",
    ),
]
M = TypeVar("M", bound=BaseModel)


def canonical(body: BaseModel) -> bytes:
    """A request body's canonical bytes (for ``once``): escaped JSON, so text that cannot be
    stored (a lone surrogate) is still hashed, and refused by validation afterwards."""
    return json.dumps(body.model_dump(mode="json"), sort_keys=True).encode()


def once(
    db: Session,
    request: Request,
    user_id: int,
    key: str | None,
    content: bytes,
    create: Callable[[], M],
    status: int = 201,
) -> M:
    """``create()`` unless this user's ``Idempotency-Key`` was answered before (then that answer
    is sent again: services/idempotency.py); the key, the answer and what was created commit
    together. Keys are per user: another user's same key is another request."""
    settings: Settings = request.app.state.settings
    scope = f"{user_id} {request.method} {request.url.path}"
    idempotency.claim(
        db_session=db, scope=scope, key=key, request=content, ttl_s=settings.idempotency_ttl_s
    )
    result = create()
    answer = result.model_dump(mode="json")
    idempotency.remember(db_session=db, scope=scope, key=key, status=status, response=answer)
    return result
