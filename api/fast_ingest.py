"""``POST /api/v1/runs/{id}/metrics`` served ahead of FastAPI's routing: the ingestion hot path.

Routing a request through this app's route table, solving its dependencies and serializing the
answer through a response model cost about as much per batch as the database work; this ASGI
middleware answers the one route itself, with the same function (``api.routes.metrics._log``),
the same body-size limit (``BodySizeLimit`` wraps it) and the same problem+json errors. The
FastAPI route stays registered: it documents the endpoint in OpenAPI, and serves what does not
match here (a non-numeric run id gets FastAPI's own 422).
"""

from __future__ import annotations

import re

from anyio import to_thread
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from api.limits import BodyTooLarge
from api.problems import known_problem, unexpected_problem
from api.routes.metrics import _log

PATH = re.compile(r"/api/v1/runs/([0-9]{1,18})/metrics")


class MetricBatchFastPath:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        match = PATH.fullmatch(scope["path"]) if scope["type"] == "http" else None
        if match is None or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        request = Request(scope, receive)
        state = request.app.state
        response: Response
        try:
            body = await request.body()
            # One worker thread does it all: validation, the transaction and its commit.
            stored = await to_thread.run_sync(
                _log, state.sessions, state.settings, int(match[1]), body, state.deferred.notify
            )
            response = Response(stored.model_dump_json(), media_type="application/json")
        except BodyTooLarge:  # BodySizeLimit's own signal: it answers 413
            raise
        except Exception as exc:
            response = known_problem(exc) or unexpected_problem(request, exc)
        await response(scope, receive, send)
