"""Typed dependencies: a route's signature lists what it needs.

``SessionDep`` is the one database session of a request. Its scope is the route function's
(``scope="function"``): the transaction commits, or rolls back, when the route returns and
before the response is sent, so no answer ever precedes its commit (FastAPI's default would
commit after the response).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session

from services.db import session_scope
from services.settings import Settings

MAX_ID = 2**31 - 1  # ids are 32-bit integers on PostgreSQL


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_db(request: Request) -> Iterator[Session]:
    with session_scope(request.app.state.sessions) as session:
        yield session


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
