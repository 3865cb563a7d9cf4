"""Live streams of a run or a sweep: consistent polls, and one feed per stream per process.

A poll reads the state of each run, then, in one statement (one snapshot), the points after
each run's position: per metric up to POLL_CHUNKS chunks, and only the steps every metric has
complete, so a step is delivered whole or not yet. The state comes first: once a poll sees a
run final, the points it reads are all there will be (a run's batches commit before its end).
A point logged later at or below a delivered step is stored but not streamed (the dispatcher
writes all metrics of a step in one batch; REST clients should too).

:class:`Hub` keeps one :class:`Feed` per (run or sweep, metric names) in the process: a task
that polls while anyone listens and hands every subscriber the same pre-encoded events. A
subscriber that joins (or resumes) behind the feed first catches up with polls of its own,
bounded by where the feed stood when it joined; one that stops reading is dropped once its
queue is full (it may resume with its last event id).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import zlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from services.chunks import Points
from services.db import session_scope
from services.history import Series, metric_names
from services.models import FINAL_STATUSES, MetricChunk, MetricName, Run
from services.numbers import point_objects
from services.telemetry import SSE_SUBSCRIBERS

log = logging.getLogger(__name__)

POLL_CHUNKS = 64  # chunks per metric per poll: a backlog drains in pieces
QUEUE_POLLS = 256  # polls a subscriber may fall behind before it is dropped
MAX_EVENT_ID_TEXT = 1 << 20  # bytes of an unpacked sweep event id: ~30,000 runs' positions


@dataclass(frozen=True)
class Source:
    """What a stream follows: one run, or every run of a sweep."""

    kind: str  # "run" | "sweep"
    id: int


@dataclass(frozen=True)
class RunState:
    run_id: int
    status: str
    error: str | None
    summary: dict[str, Any]

    @property
    def final(self) -> bool:
        return self.status in FINAL_STATUSES


@dataclass
class Poll:
    states: list[RunState]
    news: dict[int, list[Series]]  # run id -> new points per metric
    upto: dict[int, int]  # run id -> the last step this poll delivers in full
    more: bool  # some run has points left beyond ``upto``: poll again at once


def states(*, db_session: Session, source: Source) -> list[RunState]:
    column = Run.id if source.kind == "run" else Run.sweep_id
    rows = db_session.execute(
        select(Run.id, Run.status, Run.error, Run.summary).where(column == source.id)
    )
    return sorted((RunState(*row) for row in rows), key=lambda state: state.run_id)


def poll(
    *,
    db_session: Session,
    source: Source,
    positions: dict[int, int],
    names: Sequence[str] | None,
    skip: set[int],
    upto: dict[int, int] | None = None,
) -> Poll:
    """The runs' states, then their points after ``positions`` (-1: from the start) and at or
    before ``upto`` (if given), for the runs not in ``skip`` and not queued."""
    found = states(db_session=db_session, source=source)
    runs = [s.run_id for s in found if s.run_id not in skip and s.status != "queued"]
    if upto is not None:
        runs = [r for r in runs if positions.get(r, -1) < upto.get(r, -1)]
    news: dict[int, list[Series]] = {}
    bounds: dict[int, int] = {}
    more = False
    if runs:
        rows = db_session.execute(_new_chunks(runs, positions, names, upto)).all()
        named = metric_names(db_session=db_session, metric_ids=[row[1] for row in rows])
        by_run: dict[int, dict[int, list[Points]]] = {}
        for run_id, metric_id, first_step, rank, steps, values in rows:
            if rank > POLL_CHUNKS:  # more of this metric: deliver only before its next chunk
                bounds[run_id] = min(bounds.get(run_id, first_step - 1), first_step - 1)
                more = True
            else:
                by_run.setdefault(run_id, {}).setdefault(metric_id, [])
                by_run[run_id][metric_id].append(Points.decode(steps, values))
        for run_id, metrics in by_run.items():
            after = positions.get(run_id, -1)
            last = min(bounds.get(run_id, 2**63), (upto or {}).get(run_id, 2**63))
            series = [
                Series(run_id, named[mid], Points.join(parts).between(after + 1, last))
                for mid, parts in metrics.items()
            ]
            series = sorted((s for s in series if len(s.points)), key=lambda s: s.metric)
            if series:
                news[run_id] = series
    return Poll(found, news, bounds, more)


def _new_chunks(
    runs: list[int],
    positions: dict[int, int],
    names: Sequence[str] | None,
    upto: dict[int, int] | None,
) -> Any:
    """Per run and metric, the first POLL_CHUNKS + 1 chunks ending after the run's position
    (the arrays of the first POLL_CHUNKS only), in one statement."""
    c = MetricChunk
    per_run = []
    for run_id in runs:
        condition = and_(c.run_id == run_id, c.last_step > positions.get(run_id, -1))
        if upto is not None:
            condition = and_(condition, c.first_step <= upto[run_id])
        per_run.append(condition)
    where = [or_(*per_run)]
    if names is not None:
        where.append(c.metric_id.in_(select(MetricName.id).where(MetricName.name.in_(names))))
    rank = func.row_number().over(partition_by=(c.run_id, c.metric_id), order_by=c.last_step)
    inner = (
        select(c.run_id, c.metric_id, c.first_step, c.step_array, c.value_array, rank.label("rank"))
        .where(*where)
        .subquery()
    )
    wanted = inner.c.rank <= POLL_CHUNKS
    return select(
        inner.c.run_id,
        inner.c.metric_id,
        inner.c.first_step,
        inner.c.rank,
        case((wanted, inner.c.step_array)),
        case((wanted, inner.c.value_array)),
    ).where(inner.c.rank <= POLL_CHUNKS + 1)


# -- events ------------------------------------------------------------------------------------


def frame(event: str, data: str, event_id: str | None = None) -> bytes:
    """One Server-Sent Event, encoded."""
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {data}\n\n".encode()


def metrics_data(run_id: int, series: list[Series]) -> str:
    """``{"run_id", "points": [{"metric", "step", "value"}, …]}``, grouped by metric."""
    points = ",".join(point_objects(None, s.metric, s.points) for s in series)
    return f'{{"run_id":{run_id},"points":[{points}]}}'


def status_data(state: RunState) -> str:
    data = {"run_id": state.run_id, "status": state.status, "error": state.error}
    return json.dumps(data | {"summary": state.summary})


def encode_positions(positions: dict[int, int]) -> str:
    """The last delivered step of each run as one opaque SSE event id (compressed)."""
    text = ",".join(f"{run_id}:{step}" for run_id, step in sorted(positions.items()) if step >= 0)
    return base64.urlsafe_b64encode(zlib.compress(text.encode(), 9)).decode().rstrip("=")


def decode_positions(event_id: str) -> dict[int, int]:
    """The inverse of :func:`encode_positions`; ValueError for anything else."""
    try:
        padded = event_id + "=" * (-len(event_id) % 4)
        inflate = zlib.decompressobj()
        raw = inflate.decompress(base64.urlsafe_b64decode(padded.encode()), MAX_EVENT_ID_TEXT)
        if inflate.unconsumed_tail:  # a sweep's runs never need this much: a forged id
            raise ValueError("the event id unpacks to too much")
        text = raw.decode()
        pairs = [item.split(":") for item in text.split(",") if item]
        positions = {int(run_id): int(step) for run_id, step in pairs}
    except (ValueError, binascii.Error, zlib.error) as exc:
        raise ValueError("not an event id this stream sent") from exc
    if any(not 0 < r < 2**31 or not -1 <= s < 2**63 for r, s in positions.items()):
        raise ValueError("not an event id this stream sent")
    return positions


@dataclass(frozen=True)
class Event:
    """What a feed sends: its bytes, and for a status event the state it shows."""

    kind: str  # "metrics" | "status" | "end"
    data: bytes
    shown: tuple[int, str, str | None] | None = None  # (run id, status, error)


@dataclass
class Cursor:
    """Where one stream reader stands: per run, the last step delivered and the state shown."""

    source: Source
    positions: dict[int, int]
    shown: dict[int, tuple[str, str | None]] = field(default_factory=dict)
    drained: set[int] = field(default_factory=set)

    def events(self, result: Poll, may_end: bool = True) -> list[Event]:
        """The events of a poll (advancing the cursor), with ``end`` once everything is out."""
        out = []
        for state in result.states:
            shown = (state.run_id, state.status, state.error)
            if self.new_state(shown):
                out.append(Event("status", frame("status", status_data(state)), shown))
        for state in result.states:
            series = result.news.get(state.run_id)
            if series:
                self.positions[state.run_id] = max(int(s.points.steps[-1]) for s in series)
                event_id = (
                    str(self.positions[state.run_id])
                    if self.source.kind == "run"
                    else encode_positions(self.positions)
                )
                data = frame("metrics", metrics_data(state.run_id, series), event_id)
                out.append(Event("metrics", data))
            if state.final and not result.more:
                self.drained.add(state.run_id)
        if may_end and all(s.run_id in self.drained for s in result.states):
            out.append(Event("end", frame("end", self.end_data(result.states))))
        return out

    def end_data(self, found: list[RunState]) -> str:
        if self.source.kind == "run":
            status = found[0].status if found else None  # None: the run is gone
            return json.dumps({"run_id": self.source.id, "status": status})
        counts: dict[str, int] = {}
        for state in found:
            counts[state.status] = counts.get(state.status, 0) + 1
        return json.dumps({"sweep_id": self.source.id, "status_counts": counts})

    def new_state(self, shown: tuple[int, str, str | None]) -> bool:
        """Whether a run's (status, error) is not the one shown last; it is shown now."""
        run_id, status, error = shown
        if self.shown.get(run_id) == (status, error):
            return False
        self.shown[run_id] = (status, error)
        return True

    def accept(self, event: Event) -> bytes | None:
        """The bytes of a feed's event for this reader (a state shown already is not again)."""
        return None if event.shown is not None and not self.new_state(event.shown) else event.data


# -- feeds -------------------------------------------------------------------------------------


class Subscriber:
    def __init__(self, cursor: Cursor, snapshot: dict[int, int]) -> None:
        self.cursor = cursor
        self.snapshot = snapshot  # the feed's positions when this subscriber joined
        self.queue: asyncio.Queue[list[Event]] = asyncio.Queue(QUEUE_POLLS)
        self.dropped = False


class Feed:
    """One poller of one stream, broadcasting to its subscribers."""

    def __init__(self, hub: Hub, key: Any, cursor: Cursor, names: Sequence[str] | None) -> None:
        self.hub, self.key, self.cursor, self.names = hub, key, cursor, names
        self.subscribers: set[Subscriber] = set()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        try:
            while self.subscribers:
                found = await self.hub.query(
                    partial(
                        poll,
                        source=self.cursor.source,
                        positions=dict(self.cursor.positions),
                        names=self.names,
                        skip=set(self.cursor.drained),
                    )
                )
                events = self.cursor.events(found)
                for subscriber in list(self.subscribers):
                    try:
                        subscriber.queue.put_nowait(events)
                    except asyncio.QueueFull:  # it stopped reading: let it go
                        subscriber.dropped = True
                        self.subscribers.discard(subscriber)
                if events and events[-1].kind == "end":
                    return
                if not found.more:
                    await asyncio.sleep(self.hub.poll_s)
        except Exception:  # its subscribers end their streams; clients resume from their ids
            source = self.cursor.source
            log.exception("the live feed of %s %s failed", source.kind, source.id)
        finally:
            if self.hub.feeds.get(self.key) is self:
                del self.hub.feeds[self.key]
            for subscriber in self.subscribers:
                subscriber.dropped = True
                with contextlib.suppress(asyncio.QueueFull):
                    subscriber.queue.put_nowait([])  # wake it


class Hub:
    """The feeds of one process: one per stream (run or sweep) and metric names."""

    def __init__(self, sessions: sessionmaker[Session], poll_s: float) -> None:
        self.sessions = sessions
        self.poll_s = poll_s
        self.feeds: dict[Any, Feed] = {}

    async def query(self, fn: Callable[..., Poll]) -> Poll:
        def run() -> Poll:
            with session_scope(self.sessions) as db:
                return fn(db_session=db)

        return await asyncio.to_thread(run)

    def _feed(self, source: Source, names: Sequence[str] | None, positions: dict[int, int]) -> Feed:
        """The stream's shared feed, unless the reader is ahead of it somewhere: then a feed
        of its own (the shared one's events would repeat points it has)."""
        key: Any = (source, None if names is None else tuple(sorted(set(names))))
        feed = self.feeds.get(key)
        if feed is not None and any(
            step > feed.cursor.positions.get(run_id, -1) for run_id, step in positions.items()
        ):
            key, feed = (*key, object()), None
        if feed is None:
            feed = self.feeds[key] = Feed(self, key, Cursor(source, dict(positions)), names)
        return feed

    async def events(
        self, source: Source, names: Sequence[str] | None, positions: dict[int, int]
    ) -> AsyncIterator[bytes]:
        """A subscriber's events: its catch-up, then the feed's, until ``end``."""
        positions = {run_id: step for run_id, step in positions.items() if step >= 0}
        feed = self._feed(source, names, positions)
        subscriber = Subscriber(Cursor(source, positions), dict(feed.cursor.positions))
        feed.subscribers.add(subscriber)
        if feed.task is None:
            feed.task = asyncio.create_task(feed.run(), name=f"stream-{source.kind}-{source.id}")
        SSE_SUBSCRIBERS.inc()
        try:
            yield b"retry: 2000\n\n"
            async for data in self._catch_up(subscriber, names):
                yield data
            while not (subscriber.dropped and subscriber.queue.empty()):
                for event in await subscriber.queue.get():
                    accepted = subscriber.cursor.accept(event)
                    if accepted is not None:
                        yield accepted
                    if event.kind == "end":
                        return
        finally:
            feed.subscribers.discard(subscriber)
            SSE_SUBSCRIBERS.dec()

    async def _catch_up(
        self, subscriber: Subscriber, names: Sequence[str] | None
    ) -> AsyncIterator[bytes]:
        """Polls of the subscriber's own, up to where the feed stood when it joined."""
        cursor = subscriber.cursor
        while True:
            found = await self.query(
                partial(
                    poll,
                    source=cursor.source,
                    positions=dict(cursor.positions),
                    names=names,
                    skip=set(),
                    upto=subscriber.snapshot,
                )
            )
            for event in cursor.events(found, may_end=False):
                yield event.data
            if not found.more:
                return
