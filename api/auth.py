"""Who is calling: the API token (``Authorization: Bearer``, or the dashboard's session cookie),
the request's Host, and the token's request rate.

Every route under ``/api/v1`` depends on :func:`current_user`, so none can be reached without
it: with authentication off it is the built-in ``local`` admin; with it required, a valid token
or a 401. A Host header outside ``allowed_hosts`` is a 400 (a page that rebinds its DNS to this
service cannot read it), and a token past its rate a 429.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import Depends, Request
from limits import parse
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from sqlalchemy.orm import Session

from api.deps import SessionDep
from services.models import LOCAL_USER
from services.settings import Settings
from services.users import Caller, Unauthenticated, authenticate, check_quota, digest

COOKIE = "overparam_token"


class RateLimited(Exception):
    def __init__(self, limit: str, retry_after: int) -> None:
        super().__init__(f"more than {limit} requests: slow down and retry in {retry_after} s")
        self.retry_after = retry_after


class BadHost(Exception):
    """A Host header this service does not answer to."""


class CrossSite(Exception):
    """A change asked by a web page of another site (403)."""


class Limiter:
    """Requests per token, in this process (several API workers: each counts its own)."""

    def __init__(self, rate: str) -> None:
        self.rate = rate
        self.limit = parse(rate)
        self.window = MovingWindowRateLimiter(MemoryStorage())

    def hit(self, key: str) -> None:
        if not self.window.hit(self.limit, key):
            reset = self.window.get_window_stats(self.limit, key).reset_time
            raise RateLimited(self.rate, max(1, int(reset - time.time()) + 1))


def host_of(header: str) -> str:
    """The host of a Host header, without its port ("[::1]:8000" -> "[::1]")."""
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0]


def check_host(request: Request) -> None:
    allowed = request.app.state.settings.allowed_hosts
    host = host_of(request.headers.get("host", ""))
    if "*" not in allowed and host not in allowed:
        raise BadHost(f"this service does not answer to Host {host!r} (OVERPARAM_ALLOWED_HOSTS)")


def check_origin(request: Request) -> None:
    """403 for a change asked by a page of another site. Browsers send ``Origin`` with every
    POST, PATCH and DELETE; a cross-site POST without a body (``fetch(url, {method: "POST",
    mode: "no-cors"})``: a cancel) needs no pre-flight and would otherwise reach a service
    without tokens. Clients that are not browsers send no ``Origin``."""
    origin = request.headers.get("origin")
    if request.method in ("GET", "HEAD", "OPTIONS") or origin is None:
        return
    same_site = origin.split("://", 1)[-1] == request.headers.get("host", "")
    if not same_site and origin not in request.app.state.settings.cors_origins:
        raise CrossSite(f"a change asked by a page of {origin!r} (not this site's, nor in "
                        "OVERPARAM_CORS_ORIGINS)")  # fmt: skip


def bearer(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header; None without one."""
    header = request.headers.get("authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else None


def current_user(request: Request, db: SessionDep) -> Caller:
    """The caller: the local user (authentication off), or the owner of the request's token."""
    check_host(request)
    check_origin(request)
    check_media_type(request)
    state = request.app.state
    if state.auth == "off":
        return state.local_user
    token = bearer(request)
    if token is None:
        token = request.cookies.get(COOKIE)
    if not token:
        raise Unauthenticated("this service requires an API token: Authorization: Bearer <token>")
    user = Caller.of(authenticate(db_session=db, token=token))
    # The sign-in's transaction ends here, before the route's thread: a request waiting for a
    # thread must hold neither a pooled connection nor the token row (its last use), or requests
    # holding every thread could wait on it, and it on them (seen as a 500 after the pool's 30 s
    # timeout with 50 clients retrying at once). The route's statements begin a new one.
    db.commit()
    state.limiter.hit(digest(token))
    return user


CurrentUser = Annotated[Caller, Depends(current_user)]


def limited(
    db: Session, user: Caller, quota: str, asked: float, settings: Settings, stored: bool = True
) -> None:
    """The user's ``quota`` checked (``stored``: with what is asked in the transaction already);
    the local user, who owns everything while authentication is off, has none."""
    if user.name != LOCAL_USER:
        check_quota(
            db_session=db, user=user, name=quota, asked=asked, settings=settings, stored=stored
        )


class WrongMediaType(Exception):
    """A body that is not JSON where JSON is expected (415): what a cross-site form can send."""


BODY_TYPES = (
    "application/json",
    "application/x-npz",
    "application/octet-stream",
    "application/zip",
)


def check_media_type(request: Request) -> None:
    """415 for a request body that is not JSON (or a dataset's ``.npz``): a web page can make a
    browser send a cross-site ``text/plain`` or form body without asking first, but not JSON."""
    if (
        request.method not in ("POST", "PUT", "PATCH")
        or request.headers.get("content-length") == "0"
    ):
        return
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in BODY_TYPES and not kind.endswith("+json"):
        raise WrongMediaType(f"a request body must be application/json, not {kind or 'undeclared'}")
