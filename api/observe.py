"""Every HTTP request observed, never answered here: the outermost middleware gives the request
its id (``X-Request-ID``: the client's when well-formed, else a new one; on every log line of
the request and echoed in the answer) and, once the answer is out, records its latency by
method, route template and status (``services/telemetry.py``).

The route is the matched route's template (``/api/v1/runs/{run_id}``), never the raw path: one
series per route, whatever the ids. A request that matched no route (a 404, or one refused
before routing: a body over the size limit) counts as ``unmatched``.
"""

from __future__ import annotations

import time

from starlette.datastructures import MutableHeaders
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.logs import REQUEST_ID, request_id_from
from services.telemetry import REQUEST_SECONDS

HEADER = "X-Request-ID"


def route_of(scope: Scope) -> str:
    """The template of the route that answered ``scope`` (the router sets ``scope["route"]``
    as it matches).

    A route of an included router may know only its path below the router's prefix (FastAPI
    matches included routers lazily): ``/runs/{run_id}`` for ``/api/v1/runs/7``. Its path
    parameters never span a ``/``, so the template is the request path's leading segments (the
    prefix) followed by the route's own. A mount answers every path below its own.
    """
    route = scope.get("route")
    template = getattr(route, "path", None)
    if not isinstance(template, str) or not template:
        return "unmatched"
    if isinstance(route, Mount):
        return template + "/{path}"
    segments = scope["path"].split("/")
    prefix = "/".join(segments[: max(1, len(segments) - template.count("/"))])
    return prefix + template


class ObserveRequests:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = request_id_from(given.decode("latin-1") if given is not None else None)
        # Not reset afterwards: the request has a task (and context) of its own, and uvicorn
        # writes the access line of an unhandled error's 500 after this middleware returned.
        REQUEST_ID.set(request_id)
        status = 500  # unless an answer starts: an exception becomes the server's 500

        async def observed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message).append(HEADER, request_id)
            await send(message)

        began = time.perf_counter()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            REQUEST_SECONDS.labels(scope["method"], route_of(scope), str(status)).observe(
                time.perf_counter() - began
            )
