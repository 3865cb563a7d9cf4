"""Live streams (Server-Sent Events) of a run's metrics and of a whole sweep.

Events: ``metrics`` (``data: {"run_id", "points": [{"metric", "step", "value"}]}``, grouped by
metric), ``status`` (a run's state, when it changes), ``end`` (the run, or every run of the
sweep, is finished and everything was delivered), and ``: ping`` comments while nothing
happens. A run stream's event ``id`` is the last step it carries; a reconnecting client sends
it back as ``Last-Event-ID`` (or ``?after=``) and receives every later point exactly once. A
sweep stream's ``id`` packs every run's last step the same way.

The events come from the process's one feed per stream (``services/streams.py``); a client
that stops reading is cut off after ``send_timeout`` and may resume.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Query, Request
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.deps import RunId, SessionDep, SweepId
from api.routes.metrics import Names, check_query
from services import runs as run_service
from services import streams
from services.errors import FieldError, SpecError
from services.metrics import MAX_STEP

router = APIRouter(tags=["streams"])

SEND_TIMEOUT_S = 30.0
EVENT = {  # one event of a stream (the ping comments are not events)
    "type": "object",
    "properties": {
        "event": {"enum": ["metrics", "status", "end"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "id": {"type": "string", "description": "the position to resume from (Last-Event-ID)"},
        "retry": {"type": "integer"},
    },
    "required": ["event", "data"],
}
SSE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "Server-Sent Events: metrics, status, end (and ping comments)",
        "content": {"text/event-stream": {"schema": EVENT}},
    }
}
LastEventId = Annotated[str | None, Header(alias="Last-Event-ID", max_length=100_000)]


def _response(
    request: Request, source: streams.Source, names: list[str] | None, positions: dict[int, int]
) -> EventSourceResponse:
    hub: streams.Hub = request.app.state.hub
    return EventSourceResponse(
        hub.events(source, names, positions),
        ping=request.app.state.settings.stream_ping_s,
        ping_message_factory=lambda: ServerSentEvent(comment="ping"),
        send_timeout=SEND_TIMEOUT_S,
        headers={"Cache-Control": "no-cache"},
    )


def _bad_event_id(value: str) -> SpecError:
    return SpecError([FieldError("Last-Event-ID", value, "not an event id this stream sent")])


@router.get("/runs/{run_id}/metrics/stream", response_class=EventSourceResponse, responses=SSE)
def run_stream(
    run_id: RunId,
    request: Request,
    db: SessionDep,
    name: Names = None,
    after: Annotated[
        int | None, Query(ge=-1, le=MAX_STEP, description="resume after this step")
    ] = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """Server-Sent Events: the run's new metric points, its status changes, then ``end``."""
    check_query(name, None, None)
    run_service.get_run(db_session=db, run_id=run_id)
    if after is None and last_event_id:
        try:
            after = int(last_event_id)
        except ValueError as exc:
            raise _bad_event_id(last_event_id) from exc
        if not -1 <= after <= MAX_STEP:
            raise _bad_event_id(last_event_id)
    positions = {run_id: after} if after is not None else {}
    return _response(request, streams.Source("run", run_id), name, positions)


@router.get("/sweeps/{sweep_id}/stream", response_class=EventSourceResponse, responses=SSE)
def sweep_stream(
    sweep_id: SweepId,
    request: Request,
    db: SessionDep,
    name: Names = None,
    last_event_id: LastEventId = None,
) -> EventSourceResponse:
    """Server-Sent Events for every run of a sweep: points, status changes, then ``end``."""
    check_query(name, None, None)
    run_service.get_sweep(db_session=db, sweep_id=sweep_id)
    try:
        positions = streams.decode_positions(last_event_id) if last_event_id else {}
    except ValueError as exc:
        raise _bad_event_id(last_event_id or "") from exc
    return _response(request, streams.Source("sweep", sweep_id), name, positions)
