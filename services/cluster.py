"""What the API knows of the Ray cluster without being a Ray driver: the leading dispatcher's
heartbeat row, which carries each alive node's total CPU, GPU and memory."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.models import DispatcherRecord, utcnow

# A leader silent for longer than this is presumed gone (its snapshot is stale).
LEADER_TIMEOUT = timedelta(seconds=60)
# A service whose leader has not beaten for this long is not ready (runs would not start).
READY_TIMEOUT = timedelta(seconds=15)


def leader(*, db_session: Session, within: timedelta = LEADER_TIMEOUT) -> DispatcherRecord | None:
    """The dispatcher that beat most recently as leader, if it did within ``within``."""
    record = db_session.scalars(
        select(DispatcherRecord)
        .where(DispatcherRecord.leader.is_(True))
        .order_by(DispatcherRecord.heartbeat_at.desc())
        .limit(1)
    ).first()
    if record is None:
        return None
    return record if utcnow() - record.heartbeat_at <= within else None


def cluster_nodes(*, db_session: Session) -> list[dict[str, float]]:
    """Per-node totals as the live leader last saw them; [] when unknown."""
    record = leader(db_session=db_session)
    return list(record.nodes) if record is not None else []
