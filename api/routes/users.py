"""Users, their tokens, and the audit trail. ``/me`` for everyone; the rest for admins, except
that a user manages their own tokens.

POST /users {"name", "role"}          -> 201 the user and a first token (shown once)
PATCH /users/{name} {"role", "quotas", "share"}
POST /users/{name}/tokens {"name"}    -> 201 a new token (shown once)
DELETE /tokens/{id}                   -> 204 revoked
POST /session {"token"}               -> the dashboard's session cookie (same-site only)
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select, update

from api.auth import COOKIE, CurrentUser
from api.deps import MAX_ID, SessionDep, SettingsDep
from services import users as user_service
from services.errors import NotFound
from services.models import ApiToken, AuditEvent, User, utcnow

router = APIRouter(tags=["users"])

Role = Literal["admin", "member"]
UserName = Annotated[str, Path(max_length=64, description="a user's name")]


class UserPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    role: Role
    quotas: dict[str, Any]
    share: float
    created_at: datetime


class UsersPublic(BaseModel):
    data: list[UserPublic]
    count: int


class Me(UserPublic):
    limits: dict[str, float | None] = Field(description="each quota's limit (null: none)")
    usage: dict[str, float] = Field(description="each quota's current use")


class UserCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=64, description="lower-case letters, digits, _ . -")
    role: Role = "member"


class Quotas(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_active_runs: int | None = Field(None, ge=0, description="queued + running runs")
    max_running_runs: int | None = Field(None, ge=0, description="running runs")
    max_metric_points: int | None = Field(None, ge=0, description="stored metric points")
    max_dataset_bytes: int | None = Field(None, ge=0, description="bytes of datasets")


class UserUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Role | None = None
    quotas: Quotas | None = Field(None, description="this user's limits (null: the default)")
    share: float | None = Field(None, gt=0, le=1000, description="weight in the fair share")


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field("token", min_length=1, max_length=100)


class TokenPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    name: str
    prefix: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None


class TokenCreated(TokenPublic):
    token: str = Field(description="the token itself: shown this once, never again")


class UserCreated(BaseModel):
    user: UserPublic
    token: str = Field(description="a first token: shown this once, never again")


class TokensPublic(BaseModel):
    data: list[TokenPublic]
    count: int


class AuditEventPublic(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    user_id: int | None
    action: str
    target: str
    detail: dict[str, Any]


class AuditPublic(BaseModel):
    data: list[AuditEventPublic]
    count: int


class SessionCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    token: str = Field(max_length=200)


@router.get("/me", response_model=Me)
def me(user: CurrentUser, db: SessionDep, settings: SettingsDep) -> Me:
    """Who the token belongs to, with the user's quotas and their current use."""
    found = db.get(User, user.id)
    assert found is not None
    limits = {
        name: (
            None if (limit := user_service.quota(user, name, settings)) == float("inf") else limit
        )
        for name in user_service.QUOTAS
    }
    usage = {name: user_service.usage(db_session=db, user=user, name=name) for name in limits}
    return Me(**UserPublic.model_validate(found).model_dump(), limits=limits, usage=usage)


@router.get("/users", response_model=UsersPublic)
def list_users(user: CurrentUser, db: SessionDep) -> UsersPublic:
    """Every user of the lab (admins only)."""
    user_service.check_admin(user)
    rows = db.scalars(select(User).order_by(User.id)).all()
    return UsersPublic(data=[UserPublic.model_validate(u) for u in rows], count=len(rows))


@router.post("/users", status_code=status.HTTP_201_CREATED, response_model=UserCreated)
def create_user(body: UserCreate, user: CurrentUser, db: SessionDep) -> UserCreated:
    """A new user with a first token (admins only)."""
    user_service.check_admin(user)
    created, token = user_service.create_user(db_session=db, name=body.name, role=body.role)
    user_service.audit(db_session=db, user=user, action="create_user", target=f"user:{body.name}")
    return UserCreated(user=UserPublic.model_validate(created), token=token)


@router.patch("/users/{name}", response_model=UserPublic)
def update_user(name: UserName, body: UserUpdate, user: CurrentUser, db: SessionDep) -> UserPublic:
    """Change a user's role, quotas or fair share (admins only)."""
    user_service.check_admin(user)
    target = user_service.get_user(db_session=db, name=name)
    changes = body.model_dump(exclude_unset=True)
    if "quotas" in changes:
        changes["quotas"] = {k: v for k, v in (changes["quotas"] or {}).items() if v is not None}
    for key, value in changes.items():
        setattr(target, key, value)
    user_service.audit(
        db_session=db, user=user, action="update_user", target=f"user:{name}", **changes
    )
    db.flush()
    return UserPublic.model_validate(target)


@router.get("/users/{name}/tokens", response_model=TokensPublic)
def list_tokens(name: UserName, user: CurrentUser, db: SessionDep) -> TokensPublic:
    """A user's tokens (the user, or an admin): names, prefixes and when they were used."""
    target = user_service.get_user(db_session=db, name=name)
    user_service.check_owner(user, target.id, f"user {name}'s tokens")
    rows = db.scalars(select(ApiToken).where(ApiToken.user_id == target.id).order_by(ApiToken.id))
    data = [TokenPublic.model_validate(t) for t in rows]
    return TokensPublic(data=data, count=len(data))


@router.post(
    "/users/{name}/tokens", status_code=status.HTTP_201_CREATED, response_model=TokenCreated
)
def create_token(
    name: UserName, body: TokenCreate, user: CurrentUser, db: SessionDep
) -> TokenCreated:
    """A new token for a user (the user, or an admin); shown this once."""
    target = user_service.get_user(db_session=db, name=name)
    user_service.check_owner(user, target.id, f"user {name}")
    token = user_service.create_token(db_session=db, user=target, name=body.name)
    made = db.scalars(select(ApiToken).where(ApiToken.prefix == token[:12])).one()
    user_service.audit(db_session=db, user=user, action="create_token", target=f"user:{name}")
    return TokenCreated(**TokenPublic.model_validate(made).model_dump(), token=token)


@router.delete("/tokens/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(
    token_id: Annotated[int, Path(ge=1, le=MAX_ID)], user: CurrentUser, db: SessionDep
) -> Response:
    """Revoke a token (its user, or an admin): it stops working at once."""
    found = db.get(ApiToken, token_id)
    if found is None:
        raise NotFound(f"token {token_id} does not exist")
    user_service.check_owner(user, found.user_id, f"token {token_id}")
    db.execute(update(ApiToken).where(ApiToken.id == token_id).values(revoked_at=utcnow()))
    user_service.audit(db_session=db, user=user, action="revoke_token", target=f"token:{token_id}")
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.get("/audit", response_model=AuditPublic)
def audit_trail(
    user: CurrentUser,
    db: SessionDep,
    action: Annotated[str | None, Query(max_length=64)] = None,
    user_id: Annotated[int | None, Query(ge=1, le=MAX_ID)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> AuditPublic:
    """Who created, changed, cancelled or deleted what, and when; newest first (admins only)."""
    user_service.check_admin(user)
    query = select(AuditEvent)
    if action is not None:
        query = query.where(AuditEvent.action == action)
    if user_id is not None:
        query = query.where(AuditEvent.user_id == user_id)
    count = db.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = db.scalars(query.order_by(AuditEvent.id.desc()).limit(limit).offset(offset))
    return AuditPublic(data=[AuditEventPublic.model_validate(e) for e in rows], count=count)


@router.post("/session", status_code=status.HTTP_204_NO_CONTENT)
def start_session(body: SessionCreate, request: Request, db: SessionDep) -> Response:
    """Keep a token in an HttpOnly, same-site cookie (the dashboard's login: browsers cannot
    send headers with their event streams)."""
    user_service.authenticate(db_session=db, token=body.token)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    secure = request.url.scheme == "https"
    response.set_cookie(COOKIE, body.token, httponly=True, samesite="strict", secure=secure)
    return response


@router.delete("/session", status_code=status.HTTP_204_NO_CONTENT)
def end_session() -> Response:
    """Forget the dashboard's token."""
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    response.delete_cookie(COOKIE)
    return response
