"""RFC 9457 problem+json for every error, validation errors included; no stack trace leaves."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import BadHost, RateLimited, WrongMediaType
from services.errors import Conflict, FieldError, NotFound, SpecError
from services.idempotency import Replay
from services.users import Forbidden, QuotaExceeded, Unauthenticated

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
TYPE_BASE = "https://overparam.dev/problems/"


def problem(status: int, title: str, detail: str, **extra: Any) -> JSONResponse:
    body = {"type": TYPE_BASE + title.lower().replace(" ", "-"), "title": title, "status": status}
    body |= {"detail": detail, **extra}
    return JSONResponse(jsonable_encoder(body), status_code=status, media_type=PROBLEM)


def _loc_to_field(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path") else loc:
        if isinstance(part, int):
            parts[-1:] = [f"{parts[-1] if parts else ''}[{part}]"]
        else:
            parts.append(str(part))
    return ".".join(parts) or str(loc[0] if loc else "body")


def validation_problem(errors: list[FieldError]) -> JSONResponse:
    detail = "; ".join(f"{e.field}: {e.reason}" for e in errors)
    return problem(422, "Invalid request", detail, errors=[e.as_dict() for e in errors])


def known_problem(exc: Exception) -> JSONResponse | None:
    """The problem+json of a request error the service raises on purpose; None for others."""
    if isinstance(exc, RequestValidationError):
        errors = [
            FieldError(_loc_to_field(tuple(err["loc"])), err.get("input"), err["msg"])
            for err in exc.errors()
        ]
        return validation_problem(errors)
    if isinstance(exc, SpecError):
        return validation_problem(exc.errors)
    if isinstance(exc, NotFound):
        return problem(404, "Not found", str(exc))
    if isinstance(exc, Conflict):
        return problem(409, "Conflict", str(exc))
    if isinstance(exc, Unauthenticated):
        response = problem(401, "Unauthorized", str(exc))
        response.headers["WWW-Authenticate"] = "Bearer"
        return response
    if isinstance(exc, QuotaExceeded):
        return problem(
            403, "Quota exceeded", str(exc), quota=exc.quota, limit=exc.limit, used=exc.used
        )
    if isinstance(exc, Forbidden):
        return problem(403, "Forbidden", str(exc))
    if isinstance(exc, RateLimited):
        response = problem(429, "Too many requests", str(exc))
        response.headers["Retry-After"] = str(exc.retry_after)
        return response
    if isinstance(exc, BadHost):
        return problem(400, "Bad host", str(exc))
    if isinstance(exc, WrongMediaType):
        return problem(415, "Unsupported media type", str(exc))
    return None


def unexpected_problem(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, "Internal error", "an unexpected error occurred; see the server log")


def install(app: FastAPI) -> None:
    async def _known(_: Request, exc: Exception) -> JSONResponse:
        response = known_problem(exc)
        assert response is not None
        return response

    for kind in (
        RequestValidationError,
        SpecError,
        NotFound,
        Conflict,
        Unauthenticated,
        Forbidden,
        QuotaExceeded,
        RateLimited,
        BadHost,
        WrongMediaType,
    ):
        app.add_exception_handler(kind, _known)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = {404: "Not found", 405: "Method not allowed", 413: "Request too large"}.get(
            exc.status_code, "Error"
        )
        return problem(exc.status_code, title, str(exc.detail))

    @app.exception_handler(Replay)
    async def _replay(_: Request, exc: Replay) -> JSONResponse:
        """An ``Idempotency-Key`` answered before: the same answer again."""
        return JSONResponse(
            exc.body, status_code=exc.status, headers={"Idempotent-Replayed": "true"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_problem(request, exc)
