"""Gauges of the service's state, read from the database when Prometheus scrapes: no thread,
no cache, and the same numbers whichever API worker answers.

- ``overparam_runs{state}`` and ``overparam_user_runs{user,state}``: runs by state, and by
  owner and state (``user`` is empty for runs without an owner);
- ``overparam_metric_points_stored`` and ``overparam_user_metric_points{user}``: metric points
  stored, whoever wrote them (``overparam_metric_points_ingested_total`` counts only what this
  endpoint's processes wrote: not a dispatcher of its own);
- ``overparam_queue_oldest_wait_seconds``: how long the oldest queued run has waited since it
  was submitted (0 with an empty queue);
- ``overparam_dispatcher_heartbeat_age_seconds``: seconds since the leading dispatcher's last
  heartbeat (absent before any dispatcher led; above 15 the service is not ready);
- ``overparam_dispatchers{role}``: dispatchers that beat in the last minute, as leader or
  standby (one leader is healthy);
- ``overparam_ray_nodes``, ``overparam_ray_gpus``, ``overparam_ray_gpu_free_ratio``: Ray's
  worker nodes and their GPUs as the live leader last saw them (0 without one), and the part of
  those GPUs not held by running runs (absent without GPUs);
- ``overparam_database_up``: 1 when these queries answered, else 0 (and nothing above).

The run counts take one grouped scan of the ``run`` table per scrape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from datetime import datetime

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from services.cluster import LEADER_TIMEOUT, leader
from services.models import RUN_STATUSES, DispatcherRecord, Run, User, utcnow

log = logging.getLogger(__name__)

Sample = tuple[str, list[str], float]  # (name, label values, value)


class ServiceState(Collector):
    """The gauges of the module docstring, for the database behind ``sessions``."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            with self.sessions() as db:
                families = list(read_state(db))
        except SQLAlchemyError as exc:
            log.warning("/metrics: the database did not answer (%s)", type(exc).__name__)
            yield gauge("overparam_database_up", "the database answered this scrape", 0)
            return
        yield gauge("overparam_database_up", "the database answered this scrape", 1)
        yield from families


def gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, value=value)


def read_state(db: Session) -> Iterator[GaugeMetricFamily]:
    yield from runs(db)
    yield from queue(db)
    yield from dispatchers(db)
    yield from ray_cluster(db)


def runs(db: Session) -> Iterator[GaugeMetricFamily]:
    rows = db.execute(
        select(User.name, Run.status, func.count(), func.coalesce(func.sum(Run.points), 0))
        .select_from(Run)
        .outerjoin(User, Run.owner_id == User.id)
        .group_by(User.name, Run.status)
    ).all()
    by_state = dict.fromkeys(RUN_STATUSES, 0)
    by_user: dict[str, dict[str, int]] = {}
    points: dict[str, int] = {}
    for user, state, count, written in rows:
        by_state[state] = by_state.get(state, 0) + count
        by_user.setdefault(user or "", dict.fromkeys(RUN_STATUSES, 0))[state] = count
        points[user or ""] = points.get(user or "", 0) + int(written)
    states = GaugeMetricFamily("overparam_runs", "runs by state", labels=["state"])
    for state, count in by_state.items():
        states.add_metric([state], count)
    yield states
    users = GaugeMetricFamily(
        "overparam_user_runs", "runs by owner and state", labels=["user", "state"]
    )
    for user, counts in sorted(by_user.items()):
        for state, count in counts.items():
            users.add_metric([user, state], count)
    yield users
    yield gauge(
        "overparam_metric_points_stored",
        "metric points stored, of every run (whoever wrote them: the dispatchers, REST batches)",
        sum(points.values()),
    )
    stored = GaugeMetricFamily(
        "overparam_user_metric_points", "metric points stored, by owner", labels=["user"]
    )
    for user, count in sorted(points.items()):
        stored.add_metric([user], count)
    yield stored


def queue(db: Session) -> Iterator[GaugeMetricFamily]:
    oldest: datetime | None = db.scalar(
        select(func.min(Run.created_at)).where(Run.status == "queued", Run.external.is_(False))
    )
    wait = 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())
    yield gauge(
        "overparam_queue_oldest_wait_seconds",
        "time the oldest queued run has waited since it was submitted",
        wait,
    )


def dispatchers(db: Session) -> Iterator[GaugeMetricFamily]:
    now = utcnow()
    last_led: datetime | None = db.scalar(
        select(func.max(DispatcherRecord.heartbeat_at)).where(DispatcherRecord.leader.is_(True))
    )
    if last_led is not None:
        yield gauge(
            "overparam_dispatcher_heartbeat_age_seconds",
            "seconds since the leading dispatcher's last heartbeat",
            max(0.0, (now - last_led).total_seconds()),
        )
    alive = db.execute(
        select(DispatcherRecord.leader, func.count())
        .where(DispatcherRecord.heartbeat_at >= now - LEADER_TIMEOUT)
        .group_by(DispatcherRecord.leader)
    ).all()
    counts = {bool(is_leader): count for is_leader, count in alive}
    family = GaugeMetricFamily(
        "overparam_dispatchers", "dispatchers that beat in the last minute", labels=["role"]
    )
    family.add_metric(["leader"], counts.get(True, 0))
    family.add_metric(["standby"], counts.get(False, 0))
    yield family


def ray_cluster(db: Session) -> Iterator[GaugeMetricFamily]:
    record = leader(db_session=db)
    nodes = list(record.nodes) if record is not None else []
    gpus = sum(float(node.get("GPU", 0.0)) for node in nodes)
    yield gauge(
        "overparam_ray_nodes", "Ray worker nodes (as the leading dispatcher saw them)", len(nodes)
    )
    yield gauge("overparam_ray_gpus", "GPUs of Ray's worker nodes", gpus)
    if gpus > 0:
        held = db.scalars(
            select(Run.resources).where(Run.status == "running", Run.external.is_(False))
        )
        used = sum(float((resources or {}).get("gpus", 0.0)) for resources in held)
        yield gauge(
            "overparam_ray_gpu_free_ratio",
            "part of Ray's GPUs not held by running runs (0 to 1)",
            max(0.0, gpus - used) / gpus,
        )
