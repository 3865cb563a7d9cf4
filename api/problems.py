"""RFC 9457 problem+json for every error, validation errors included; no stack trace leaves.

A problem echoes the invalid values it names, and those can be anything a client sent: NaN,
lone surrogates, lists nested 900 deep, megabytes of text. They are echoed JSON-safe and short
(:func:`echo`), and every string of a problem is valid UTF-8 (:func:`printable`), so rendering
a refusal can never fail.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.auth import BadHost, CrossSite, RateLimited, WrongMediaType
from services.errors import Conflict, FieldError, NotFound, SpecError
from services.idempotency import Replay
from services.numbers import json_number
from services.users import Forbidden, QuotaExceeded, Unauthenticated

log = logging.getLogger(__name__)

PROBLEM = "application/problem+json"
TYPE_BASE = "https://overparam.dev/problems/"
TITLES = {
    400: "Bad request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict",
    413: "Request too large",
    415: "Unsupported media type",
    422: "Invalid request",
    429: "Too many requests",
    500: "Internal error",
    501: "Not implemented",
    503: "Not ready",
}
PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}


class ProblemField(BaseModel):
    """One invalid field of a request."""

    field: str = Field(description="where, as the client wrote it: base.data.n, grid.width[1]")
    value: Any = Field(description="the value sent, shortened (non-finite numbers as words)")
    reason: str


class Problem(BaseModel):
    """An error (RFC 9457 problem details), served as ``application/problem+json``."""

    type: str = Field(description="a URI naming the kind of problem")
    title: str
    status: int = Field(description="the HTTP status code")
    detail: str = Field(description="what went wrong, for people")
    errors: list[ProblemField] | None = Field(
        None, description="422: every invalid field of the request"
    )


def problem_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` declaring ``statuses`` as problems (for route decorators)."""
    return {
        status: {"description": TITLES[status], "content": {PROBLEM: {"schema": PROBLEM_REF}}}
        for status in statuses
    }


ECHO_DEPTH = 4  # levels of an invalid value shown in a problem
ECHO_ITEMS = 20  # items of a list or object shown
ECHO_CHARS = 200  # characters of a string shown


def printable(text: str) -> str:
    """``text`` as valid UTF-8: a lone surrogate becomes the six characters of its escape."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _printable_tree(value: Any) -> Any:
    if isinstance(value, str):
        return printable(value)
    if isinstance(value, dict):
        return {printable(str(k)): _printable_tree(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_printable_tree(item) for item in value]
    return value


def _echo_container(value: dict[Any, Any] | list[Any] | tuple[Any, ...], depth: int) -> Any:
    if depth >= ECHO_DEPTH:
        return f"{'an object' if isinstance(value, dict) else 'a list'} of {len(value)} items"
    if isinstance(value, dict):
        keys = list(value)[:ECHO_ITEMS]
        return {echo(str(k)): echo(value[k], depth + 1) for k in keys}
    return [echo(item, depth + 1) for item in value[:ECHO_ITEMS]]


def echo(value: Any, depth: int = 0) -> Any:
    """An invalid value as a problem shows it: JSON-safe (non-finite numbers as their words,
    lone surrogates escaped, bytes as their length) and short (deep or long containers and
    long strings cut)."""
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        return json_number(value)
    if isinstance(value, bytes | bytearray):
        return f"{len(value)} bytes"
    if isinstance(value, dict | list | tuple):
        return _echo_container(value, depth)
    text = value if isinstance(value, str) else str(value)
    return printable(text[:ECHO_CHARS] + ("…" if len(text) > ECHO_CHARS else ""))


def problem(
    status: int,
    title: str,
    detail: str,
    headers: Mapping[str, str] | None = None,
    **extra: Any,
) -> JSONResponse:
    """The problem+json response; ``extra`` members (``errors``) must be JSON-safe."""
    body = {"type": TYPE_BASE + title.lower().replace(" ", "-"), "title": title, "status": status}
    body = _printable_tree(body | {"detail": detail} | jsonable_encoder(extra))
    return JSONResponse(body, status_code=status, media_type=PROBLEM, headers=headers)


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
    shown = [{"field": e.field, "value": echo(e.value), "reason": e.reason} for e in errors]
    return problem(422, TITLES[422], detail, errors=shown)


def _field_error(error: Any) -> FieldError:
    """One of pydantic's errors as ours; a body that is not JSON is the field ``body``."""
    if error["type"] == "json_invalid":
        reason = f"not JSON: {error.get('ctx', {}).get('error')}"
        if error["loc"]:  # FastAPI's parse says where; pydantic's model_validate_json does not
            reason += f" at character {error['loc'][-1]}"
        return FieldError("body", None, reason)
    return FieldError(_loc_to_field(tuple(error["loc"])), error.get("input"), error["msg"])


def known_problem(exc: Exception) -> JSONResponse | None:
    """The problem+json of a request error the service raises on purpose; None for others."""
    if isinstance(exc, RequestValidationError):
        return validation_problem([_field_error(error) for error in exc.errors()])
    if isinstance(exc, SpecError):
        return validation_problem(exc.errors)
    if isinstance(exc, NotFound):
        return problem(404, TITLES[404], str(exc))
    if isinstance(exc, Conflict):
        return problem(409, TITLES[409], str(exc))
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
    if isinstance(exc, CrossSite):
        return problem(403, "Cross-site request", str(exc))
    if isinstance(exc, BadHost):
        return problem(400, "Bad host", str(exc))
    if isinstance(exc, WrongMediaType):
        return problem(415, "Unsupported media type", str(exc))
    return None


def unexpected_problem(request: Request, exc: Exception) -> JSONResponse:
    log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, TITLES[500], "an unexpected error occurred; see the server log")


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
        CrossSite,
        WrongMediaType,
    ):
        app.add_exception_handler(kind, _known)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        title = TITLES.get(exc.status_code, "Error")
        return problem(exc.status_code, title, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Replay)
    async def _replay(_: Request, exc: Replay) -> JSONResponse:
        """An ``Idempotency-Key`` answered before: the same answer again."""
        return JSONResponse(
            exc.body, status_code=exc.status, headers={"Idempotent-Replayed": "true"}
        )

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        return unexpected_problem(request, exc)
