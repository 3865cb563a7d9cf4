"""A database session that commits *before* the response is sent.

FastAPI ends a ``yield`` dependency after the response by default (``scope="request"``): a
client could read a 201 and ask for the new resource before the commit, or be told "stored"
about a transaction whose commit then fails. ``scope="function"`` commits (or rolls back)
when the route returns.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends
from sqlalchemy.orm import Session

from api.deps import get_db

CommittedSessionDep = Annotated[Session, Depends(get_db, scope="function")]
