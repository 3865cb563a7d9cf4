"""Polls behind the live streams (SSE): what is new in a run, or in every run of a sweep.

A stream remembers, per run, the last step it delivered; a poll returns the points after it in
step order, all metrics together, through one short database session (the API opens one per
poll: no connection is held for the life of a stream). Steps go out in order, so the last
delivered step is a complete resume point: a client that reconnects with it (SSE
``Last-Event-ID``) receives every later point exactly once. A point logged later with a step
at or below one already streamed is stored but not streamed — log all metrics of a step in one
batch (the dispatcher does).

The run's status is read before its points: once a poll sees a final status, the points it
reads are all there will be (every batch commits before the run is finished).
"""

from __future__ import annotations

import base64
import binascii
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.history import run_metric_ids
from services.models import FINAL_STATUSES, Run
from services.rollups import series


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
class RunPoll:
    """One poll of one run: its state and the new points (step, [(metric, stored value)])."""

    state: RunState
    steps: list[tuple[int, list[tuple[str, float | None]]]] = field(default_factory=list)
    more: bool = False  # the limit cut the poll short: poll again at once

    @property
    def drained(self) -> bool:
        """Final and nothing left to deliver: the stream of this run can end."""
        return self.state.final and not self.more


def run_state(*, db_session: Session, run_id: int) -> RunState | None:
    row = db_session.execute(
        select(Run.status, Run.error, Run.summary).where(Run.id == run_id)
    ).one_or_none()
    return None if row is None else RunState(run_id, row.status, row.error, row.summary)


def new_points(
    *,
    db_session: Session,
    run_id: int,
    after: int,
    names: Sequence[str] | None,
    limit: int,
) -> tuple[list[tuple[int, list[tuple[str, float | None]]]], bool]:
    """Points with step > ``after`` grouped by step, in step order, and whether more remain.

    Each metric is read up to ``limit`` points; when one hits the limit, only the steps up to
    its last are complete and delivered (the rest come with the next poll).
    """
    known = run_metric_ids(db_session=db_session, run_id=run_id)
    wanted = sorted(set(names) & set(known) if names else known)
    per_metric = {
        name: series(db_session, run_id, known[name], after + 1, None, limit) for name in wanted
    }
    full = [points[-1][0] for points in per_metric.values() if len(points) >= limit]
    upto = min(full) if full else None
    steps: dict[int, list[tuple[str, float | None]]] = {}
    for name, points in per_metric.items():
        for step, value in points:
            if upto is None or step <= upto:
                steps.setdefault(step, []).append((name, value))
    return sorted(steps.items()), bool(full)


def poll_run(
    *, db_session: Session, run_id: int, after: int, names: Sequence[str] | None, limit: int
) -> RunPoll | None:
    """The run's state, then its points after ``after`` (None: the run does not exist)."""
    state = run_state(db_session=db_session, run_id=run_id)
    if state is None:
        return None
    steps, more = new_points(
        db_session=db_session, run_id=run_id, after=after, names=names, limit=limit
    )
    return RunPoll(state, steps, more)


def sweep_states(*, db_session: Session, sweep_id: int) -> list[RunState]:
    rows = db_session.execute(
        select(Run.id, Run.status, Run.error, Run.summary)
        .where(Run.sweep_id == sweep_id)
        .order_by(Run.id)
    )
    return [RunState(r.id, r.status, r.error, r.summary) for r in rows]


# -- sweep stream resume points ------------------------------------------------------------------


def encode_positions(positions: dict[int, int]) -> str:
    """The last delivered step of each run as one opaque SSE event id (compressed)."""
    text = ",".join(f"{run_id}:{step}" for run_id, step in sorted(positions.items()) if step >= 0)
    return base64.urlsafe_b64encode(zlib.compress(text.encode(), 9)).decode().rstrip("=")


def decode_positions(event_id: str) -> dict[int, int]:
    """The inverse of :func:`encode_positions`; ValueError for anything else."""
    try:
        padded = event_id + "=" * (-len(event_id) % 4)
        text = zlib.decompress(base64.urlsafe_b64decode(padded.encode())).decode()
        pairs = [item.split(":") for item in text.split(",") if item]
        return {int(run_id): int(step) for run_id, step in pairs}
    except (ValueError, binascii.Error, zlib.error) as exc:
        raise ValueError("not an event id this stream sent") from exc
