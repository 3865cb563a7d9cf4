"""This process's Prometheus instruments (prometheus_client), written where things happen.

- requests: latency by method, route template and status (``api/observe.py``);
- metric points ingested: counted when the transaction that stored them commits;
- live-stream subscribers and database connections in use / in overflow: gauges of this
  process's own state, kept up to date by the stream hub and by the pool's events.

Under several uvicorn workers each process writes its values to files in
``PROMETHEUS_MULTIPROC_DIR`` and ``GET /metrics`` adds them up (prometheus_client's multiprocess
mode; ``overparam serve --workers N`` sets the directory up). The gauges are summed over live
processes (``livesum``). What the database and the cluster know (runs by state, the queue, the
dispatchers, Ray's nodes) is read at scrape time instead: ``services/state_metrics.py``.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram
from sqlalchemy import Engine, event
from sqlalchemy.orm import Session

REQUEST_SECONDS = Histogram(
    "overparam_http_request_duration_seconds",
    "HTTP requests by method, route template and status: time to the end of the answer "
    "(a live stream's whole life)",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
POINTS_INGESTED = Counter(
    "overparam_metric_points_ingested",
    "metric points stored (new points only; a re-sent point is not counted), by the processes "
    "behind this endpoint: REST batches, and the dispatcher when it is embedded",
)
SSE_SUBSCRIBERS = Gauge(
    "overparam_sse_subscribers",
    "clients reading a live metric stream (server-sent events)",
    multiprocess_mode="livesum",
)
DB_CONNECTIONS_IN_USE = Gauge(
    "overparam_db_pool_connections_in_use",
    "database connections checked out of the pools (pool and overflow together)",
    multiprocess_mode="livesum",
)
DB_CONNECTIONS_OVERFLOW = Gauge(
    "overparam_db_pool_overflow_connections",
    "database connections open beyond the pools' size (db_pool_size; up to db_max_overflow)",
    multiprocess_mode="livesum",
)

_PENDING_POINTS = "overparam_points_pending"


def points_written(db_session: Session, new: int) -> None:
    """Count ``new`` stored points once ``db_session`` commits (never if it rolls back)."""
    db_session.info[_PENDING_POINTS] = db_session.info.get(_PENDING_POINTS, 0) + new


@event.listens_for(Session, "after_commit")
def _count_committed_points(session: Session) -> None:
    new = session.info.pop(_PENDING_POINTS, 0)
    if new:
        POINTS_INGESTED.inc(new)


@event.listens_for(Session, "after_rollback")
def _forget_rolled_back_points(session: Session) -> None:
    session.info.pop(_PENDING_POINTS, None)


def instrument_pool(engine: Engine) -> None:
    """Keep the connection gauges up to date from ``engine``'s pool events (a checkout and its
    check-in always come in pairs, also for a connection that was invalidated)."""
    pool = engine.pool
    overflow = [0]  # this pool's part of the overflow gauge

    def measure_overflow() -> None:
        now = max(0, int(getattr(pool, "overflow", lambda: 0)()))
        DB_CONNECTIONS_OVERFLOW.inc(now - overflow[0])
        overflow[0] = now

    @event.listens_for(pool, "checkout")
    def _checkout(*_: Any) -> None:
        DB_CONNECTIONS_IN_USE.inc()
        measure_overflow()

    @event.listens_for(pool, "checkin")
    def _checkin(*_: Any) -> None:
        DB_CONNECTIONS_IN_USE.dec()
        measure_overflow()

    @event.listens_for(pool, "close")
    def _close(*_: Any) -> None:
        measure_overflow()
