"""Lab users, their API tokens, ownership checks, quotas and the audit trail.

Tokens are ``ovp_`` + 43 random URL-safe characters (256 bits); only their SHA-256 is stored, so
a leaked database leaks no token. A token is shown once, when it is made; it can be revoked, and
records when it was last used (at most once a minute, so reads do not all become writes).
Reads are open to every user of the lab; changing an object needs its owner or an admin.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from services.errors import Conflict, FieldError, NotFound, SpecError
from services.models import LOCAL_USER, ApiToken, AuditEvent, Dataset, Run, User, utcnow
from services.settings import Settings

NAME = re.compile(r"^[a-z][a-z0-9_.-]{0,63}$")
TOKEN_PREFIX = "ovp_"
LAST_USED_EVERY = timedelta(minutes=1)


class Unauthenticated(Exception):
    """No token, or one that is not valid (401)."""


class Forbidden(Exception):
    """Authenticated, but not allowed (403)."""


class QuotaExceeded(Exception):
    """A user's quota would be exceeded (403), with its name, limit and current use."""

    def __init__(self, quota: str, limit: float, used: float, asked: float) -> None:
        super().__init__(
            f"quota {quota} exceeded: {used:g} used + {asked:g} asked > limit {limit:g} "
            "(an admin can raise it: PATCH /api/v1/users/{name})"
        )
        self.quota, self.limit, self.used, self.asked = quota, limit, used, asked


@dataclass(frozen=True)
class Caller:
    """The user a request acts for (what the checks below need of a user)."""

    id: int
    name: str
    role: str
    quotas: dict[str, Any]

    @classmethod
    def of(cls, user: User) -> Caller:
        return cls(user.id, user.name, user.role, dict(user.quotas or {}))

    @property
    def admin(self) -> bool:
        return self.role == "admin"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def local_user(*, db_session: Session) -> User:
    """The built-in admin that owns everything while authentication is off."""
    user = db_session.scalars(select(User).where(User.name == LOCAL_USER)).one_or_none()
    if user is None:  # the migration makes it; a database made otherwise gets it here
        user = User(name=LOCAL_USER, role="admin", quotas={}, share=1.0)
        db_session.add(user)
        db_session.flush()
    return user


def authenticate(*, db_session: Session, token: str) -> User:
    """The user of a valid (not revoked) token; Unauthenticated otherwise."""
    found = db_session.execute(
        select(ApiToken, User)
        .join(User, User.id == ApiToken.user_id)
        .where(ApiToken.digest == digest(token), ApiToken.revoked_at.is_(None))
    ).one_or_none()
    if found is None:
        raise Unauthenticated("the token is not valid (revoked, or never made here)")
    stored, user = found
    now = utcnow()
    if stored.last_used_at is None or now - stored.last_used_at > LAST_USED_EVERY:
        db_session.execute(
            update(ApiToken).where(ApiToken.id == stored.id).values(last_used_at=now)
        )
    return user


def admins(*, db_session: Session) -> int:
    """How many admins there are, the built-in local one aside."""
    query = select(func.count()).where(User.role == "admin", User.name != LOCAL_USER)
    return int(db_session.scalar(query) or 0)


def create_user(*, db_session: Session, name: str, role: str) -> tuple[User, str]:
    """A new user and a first token (shown once)."""
    if not NAME.match(name) or name == LOCAL_USER:
        reason = "lower-case letters, digits, _ . - (1-64, starting with a letter), not 'local'"
        raise SpecError([FieldError("name", name, reason)])
    if db_session.scalars(select(User).where(User.name == name)).first() is not None:
        raise Conflict(f"user {name!r} exists already")
    user = User(name=name, role=role, quotas={}, share=1.0)
    db_session.add(user)
    db_session.flush()
    return user, create_token(db_session=db_session, user=user, name="first")


def create_token(*, db_session: Session, user: User, name: str) -> str:
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    db_session.add(ApiToken(user_id=user.id, name=name, digest=digest(token), prefix=token[:12]))
    db_session.flush()
    return token


def get_user(*, db_session: Session, name: str) -> User:
    user = db_session.scalars(select(User).where(User.name == name)).one_or_none()
    if user is None:
        raise NotFound(f"user {name!r} does not exist")
    return user


def check_owner(user: Caller, owner_id: int | None, what: str) -> None:
    """Forbidden unless ``user`` owns the object (or is an admin)."""
    if not user.admin and owner_id != user.id:
        raise Forbidden(f"{what} belongs to another user: only its owner or an admin may change it")


def check_admin(user: Caller) -> None:
    if not user.admin:
        raise Forbidden("only an admin may do this")


def audit(*, db_session: Session, user: Caller, action: str, target: str, **detail: Any) -> None:
    """Record who did ``action`` to ``target`` (in the action's own transaction)."""
    db_session.add(AuditEvent(user_id=user.id, action=action, target=target, detail=detail))


# -- quotas -------------------------------------------------------------------------------------

QUOTAS = ("max_active_runs", "max_running_runs", "max_metric_points", "max_dataset_bytes")


def quota(user: Caller, name: str, settings: Settings) -> float:
    """The user's limit ``name`` (their own, else the settings' default; 0 is no limit)."""
    value = (user.quotas or {}).get(name, getattr(settings, f"quota_{name}"))
    return float(value) if value else float("inf")


def check_quota(
    *,
    db_session: Session,
    user: Caller,
    name: str,
    asked: float,
    settings: Settings,
    stored: bool = False,
) -> None:
    """QuotaExceeded if the user's use of ``name`` plus ``asked`` passes the limit (``stored``:
    what is asked is in the transaction already, and counted in the use). Raised before the
    commit, it leaves nothing stored."""
    limit = quota(user, name, settings)
    if limit == float("inf"):
        return
    used = usage(db_session=db_session, user=user, name=name) - (asked if stored else 0)
    if used + asked > limit:
        raise QuotaExceeded(name, limit, used, asked)


def usage(*, db_session: Session, user: Caller, name: str) -> float:
    """The user's current use of quota ``name``."""
    mine = Run.owner_id == user.id
    if name == "max_active_runs":
        query = select(func.count()).where(mine, Run.status.in_(("queued", "running")))
    elif name == "max_running_runs":
        query = select(func.count()).where(mine, Run.status == "running")
    elif name == "max_metric_points":
        query = select(func.coalesce(func.sum(Run.points), 0)).where(mine)
    else:
        query = select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(
            Dataset.owner_id == user.id
        )
    return float(db_session.scalar(query) or 0)
