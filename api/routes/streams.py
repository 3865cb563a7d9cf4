"""Live streams (Server-Sent Events) of a run's metrics and of a whole sweep.

Events: ``metrics`` (``data: {"run_id", "points": [{"metric", "step", "value"}]}``), ``status``
(a run's state, when it changes), ``end`` (the run, or every run of the sweep, is finished and
everything was delivered), and ``: ping`` comments while nothing happens. A run stream's event
``id`` is the last step it carries; a reconnecting client sends it back as ``Last-Event-ID``
(or ``?after=``) and receives every later point exactly once. A sweep stream's ``id`` packs
every run's last step the same way.

Async generators that sleep between polls; each poll opens one short database session in a
worker thread (no connection is held for the life of a stream).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy.orm import Session

from api.routes.metrics import Names, check_query, value_json
from services import runs as run_service
from services import streams
from services.db import session_scope
from services.errors import FieldError, SpecError
from services.settings import Settings

router = APIRouter(tags=["streams"])

POLL_LIMIT = 5_000  # points per metric per poll: a backlog drains in pieces
HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
T = TypeVar("T")

LastEventId = Annotated[str | None, Header(alias="Last-Event-ID")]


def sse(event: str, data: str, event_id: str | None = None) -> str:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n"


def shown_as(state: streams.RunState) -> tuple[str, str | None]:
    """What a ``status`` event is sent for: the state and error (not every summary update)."""
    return state.status, state.error


def status_event(state: streams.RunState) -> str:
    data = {"run_id": state.run_id, "status": state.status, "error": state.error}
    return sse("status", json.dumps(data | {"summary": state.summary}))


def metrics_data(run_id: int, steps: list[tuple[int, list[tuple[str, float | None]]]]) -> str:
    points = ",".join(
        f'{{"metric":{json.dumps(name)},"step":{step},"value":{value_json(value)}}}'
        for step, values in steps
        for name, value in values
    )
    return f'{{"run_id":{run_id},"points":[{points}]}}'


class Poller:
    """Runs one short-session query per poll in a worker thread; sends pings when idle."""

    def __init__(self, request: Request) -> None:
        self.request = request
        self.settings: Settings = request.app.state.settings
        self.sent_at = time.monotonic()

    async def query(self, fn: Callable[[Session], T]) -> T:
        def run() -> T:
            with session_scope(self.request.app.state.sessions) as db:
                return fn(db)

        return await asyncio.to_thread(run)

    def sent(self) -> None:
        self.sent_at = time.monotonic()

    async def wait(self) -> str | None:
        """Sleep one poll period; a ping comment if the stream has been quiet too long."""
        await asyncio.sleep(self.settings.stream_poll_s)
        if time.monotonic() - self.sent_at >= self.settings.stream_ping_s:
            self.sent()
            return ": ping\n\n"
        return None


def parse_after(after: int | None, last_event_id: str | None) -> int:
    if after is not None:
        return after
    if last_event_id is None or last_event_id == "":
        return -1
    try:
        step = int(last_event_id)
        if step < -1:
            raise ValueError
    except ValueError as exc:
        raise SpecError(
            [FieldError("Last-Event-ID", last_event_id, "not an event id this stream sent")]
        ) from exc
    return step


def _poll_run(
    db: Session, *, run_id: int, after: int, names: list[str] | None
) -> streams.RunPoll | None:
    return streams.poll_run(
        db_session=db, run_id=run_id, after=after, names=names, limit=POLL_LIMIT
    )


async def run_events(
    request: Request, run_id: int, after: int, names: list[str] | None
) -> AsyncIterator[str]:
    poller = Poller(request)
    shown: tuple[str, str | None] | None = None
    yield "retry: 2000\n\n"
    while not await request.is_disconnected():
        poll = await poller.query(partial(_poll_run, run_id=run_id, after=after, names=names))
        if poll is None:  # deleted meanwhile
            yield sse("end", json.dumps({"run_id": run_id, "status": None}))
            return
        if shown_as(poll.state) != shown:
            shown = shown_as(poll.state)
            yield status_event(poll.state)
            poller.sent()
        if poll.steps:
            after = poll.steps[-1][0]
            yield sse("metrics", metrics_data(run_id, poll.steps), str(after))
            poller.sent()
        if poll.drained:
            yield sse("end", json.dumps({"run_id": run_id, "status": poll.state.status}))
            return
        if not poll.more:
            ping = await poller.wait()
            if ping:
                yield ping


@router.get("/runs/{run_id}/metrics/stream", response_class=StreamingResponse)
def run_stream(
    run_id: int,
    request: Request,
    name: Names = None,
    after: Annotated[int | None, Query(ge=-1, description="resume after this step")] = None,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    """Server-Sent Events: the run's new metric points, its status changes, then ``end``."""
    check_query(name, None, None)
    # A short session of its own: a yield dependency's would stay open as long as the stream.
    with session_scope(request.app.state.sessions) as db:
        run_service.get_run(db_session=db, run_id=run_id)
    start = parse_after(after, last_event_id)
    events = run_events(request, run_id, start, name)
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)


def _poll_sweep(
    db: Session,
    *,
    sweep_id: int,
    positions: dict[int, int],
    drained: set[int],
    names: list[str] | None,
) -> tuple[list[streams.RunState], dict[int, Any], bool]:
    """States of every run, then the new points of each run not yet drained."""
    states = streams.sweep_states(db_session=db, sweep_id=sweep_id)
    news: dict[int, Any] = {}
    more = False
    for state in states:
        if state.run_id in drained or state.status == "queued":
            continue
        steps, full = streams.new_points(
            db_session=db,
            run_id=state.run_id,
            after=positions.get(state.run_id, -1),
            names=names,
            limit=POLL_LIMIT,
        )
        news[state.run_id] = (steps, full)
        more = more or full
    return states, news, more


async def sweep_events(
    request: Request, sweep_id: int, positions: dict[int, int], names: list[str] | None
) -> AsyncIterator[str]:
    poller = Poller(request)
    shown: dict[int, tuple[str, str | None]] = {}
    drained: set[int] = set()
    yield "retry: 2000\n\n"
    while not await request.is_disconnected():
        states, news, more = await poller.query(
            partial(
                _poll_sweep, sweep_id=sweep_id, positions=positions, drained=drained, names=names
            )
        )
        for state in states:
            if shown.get(state.run_id) != shown_as(state):
                shown[state.run_id] = shown_as(state)
                yield status_event(state)
                poller.sent()
        for state in states:
            steps, full = news.get(state.run_id, ([], False))
            if steps:
                positions[state.run_id] = steps[-1][0]
                event_id = streams.encode_positions(positions)
                yield sse("metrics", metrics_data(state.run_id, steps), event_id)
                poller.sent()
            if state.final and state.run_id in news and not full:
                drained.add(state.run_id)
        if states and all(state.run_id in drained for state in states):
            counts: dict[str, int] = {}
            for state in states:
                counts[state.status] = counts.get(state.status, 0) + 1
            yield sse("end", json.dumps({"sweep_id": sweep_id, "status_counts": counts}))
            return
        if not more:
            ping = await poller.wait()
            if ping:
                yield ping


@router.get("/sweeps/{sweep_id}/stream", response_class=StreamingResponse)
def sweep_stream(
    sweep_id: int,
    request: Request,
    name: Names = None,
    last_event_id: LastEventId = None,
) -> StreamingResponse:
    """Server-Sent Events for every run of a sweep: points, status changes, then ``end``."""
    check_query(name, None, None)
    with session_scope(request.app.state.sessions) as db:
        run_service.get_sweep(db_session=db, sweep_id=sweep_id)
    try:
        positions = streams.decode_positions(last_event_id) if last_event_id else {}
    except ValueError as exc:
        raise SpecError([FieldError("Last-Event-ID", last_event_id, str(exc))]) from exc
    events = sweep_events(request, sweep_id, positions, name)
    return StreamingResponse(events, media_type="text/event-stream", headers=HEADERS)
