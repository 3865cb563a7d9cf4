"""The schema: sweeps, runs, normalized metric names, metric points and their rollups, datasets.

Metric points are keyed on (run, metric, step) only (MLflow's all-column primary key bloated to
11 GiB at 100M rows). A NULL value stores NaN: SQLite cannot hold NaN in a REAL column, so both
backends use the same convention; ±inf are stored as they are. ``metric_rollup`` keeps, per
power-of-8 step bucket, the bucket's minimum and maximum point, so that a plot of a 1M-point
history reads a few thousand rows instead of a million (see ``services/metrics.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Text,
    TypeDecorator,
    false,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

RUN_STATUSES = ("queued", "running", "succeeded", "diverged", "failed", "cancelled")
FINAL_STATUSES = frozenset({"succeeded", "diverged", "failed", "cancelled"})

JsonType = JSON().with_variant(JSONB(), "postgresql")


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both backends (SQLite stores no zone and returns naive values)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Sweep(Base):
    __tablename__ = "sweep"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    run_count: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Run(Base):
    __tablename__ = "run"
    __table_args__ = (
        CheckConstraint(f"status IN {RUN_STATUSES!r}", name="status"),
        Index("ix_run_status_id", "status", "id"),
        Index("ix_run_sweep_id_id", "sweep_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweep.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer, default=0)
    config: Mapped[dict[str, Any]] = mapped_column(JsonType)
    overrides: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    summary: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    manifest: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    # Logged to over REST by its own training script: never claimed by the dispatcher.
    external: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The resolved request (services.resources.ResourceRequest.as_dict()); {} = estimate it.
    resources: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)


class DispatcherRecord(Base):
    """A dispatcher process's heartbeat; the leader's row also carries the cluster's nodes."""

    __tablename__ = "dispatcher"

    id: Mapped[str] = mapped_column(String(128), primary_key=True)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    leader: Mapped[bool] = mapped_column(Boolean, default=False)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    heartbeat_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    nodes: Mapped[list[dict[str, float]]] = mapped_column(JsonType, default=list)


class MetricName(Base):
    __tablename__ = "metric_name"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)


class Metric(Base):
    """One point. No foreign keys: checking them per point halves PostgreSQL's COPY rate, and
    points are only written by ``services.metrics.write_points`` for runs its callers hold.
    Deleting a run must delete its points and rollups."""

    __tablename__ = "metric"
    # The primary key is the table on SQLite: no separate rowid b-tree per point.
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 (SQLAlchemy reads it once)

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    metric_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True
    )
    value: Mapped[float | None] = mapped_column(Double)


class MetricRollup(Base):
    """Per (run, metric, level, bucket): the bucket's lowest and highest point.

    Level ``L`` buckets steps by ``step >> (5 + 3 L)`` (32, 256, 2048, … steps). ``min_*`` /
    ``max_*`` are the point with the lowest / highest non-NaN value (ties: the lower step); in a
    bucket of NaN only both values are NULL and both steps are its first step.
    """

    __tablename__ = "metric_rollup"
    __table_args__ = {"sqlite_with_rowid": False}  # noqa: RUF012 (SQLAlchemy reads it once)

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    metric_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    level: Mapped[int] = mapped_column(SmallInteger, primary_key=True)
    bucket: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True
    )
    min_step: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    min_value: Mapped[float | None] = mapped_column(Double)
    max_step: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    max_value: Mapped[float | None] = mapped_column(Double)


def _array(item: type[Integer] | type[SmallInteger] | type[BigInteger] | type[Double]) -> Any:
    """An array column on PostgreSQL (JSON on SQLite, which never writes the table)."""
    return JSON().with_variant(ARRAY(item()), "postgresql")


class MetricRollupPending(Base):
    """Rollup summaries of committed batches, not merged into ``metric_rollup`` yet.

    PostgreSQL only (SQLite merges in the batch's transaction): a batch inserts one row, its
    summaries as parallel arrays, instead of upserting them, and a background merger (or the
    next downsampled read of the run) merges and deletes it. See ``services/rollups.py``.
    """

    __tablename__ = "metric_rollup_pending"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(Integer, index=True)
    metric_ids: Mapped[list[int]] = mapped_column(_array(Integer))
    levels: Mapped[list[int]] = mapped_column(_array(SmallInteger))
    buckets: Mapped[list[int]] = mapped_column(_array(BigInteger))
    min_steps: Mapped[list[int]] = mapped_column(_array(BigInteger))
    min_values: Mapped[list[float | None]] = mapped_column(_array(Double))
    max_steps: Mapped[list[int]] = mapped_column(_array(BigInteger))
    max_values: Mapped[list[float | None]] = mapped_column(_array(Double))


class MetricBatchQueue(Base):
    """Metric batches posted over REST and committed, not moved into ``metric`` yet.

    PostgreSQL only (SQLite writes a batch in its request): one row per batch, its points as
    the bytes of three arrays (metric ids int32, steps int64, values float64). See the
    write-behind section of ``services/metrics.py``.
    """

    __tablename__ = "metric_batch_queue"

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer(), "sqlite"), primary_key=True
    )
    run_id: Mapped[int] = mapped_column(Integer, index=True)
    metric_ids: Mapped[list[int]] = mapped_column(_array(Integer))
    first_step: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    last_step: Mapped[int] = mapped_column(BigInteger().with_variant(Integer(), "sqlite"))
    points: Mapped[int] = mapped_column(Integer)
    payload: Mapped[bytes] = mapped_column(LargeBinary)


class Dataset(Base):
    """Uploaded training data: X (n, d) and y (n,) or (n, k), float64 little-endian bytes."""

    __tablename__ = "dataset"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    n: Mapped[int] = mapped_column(Integer)
    d: Mapped[int] = mapped_column(Integer)
    # 0: y has shape (n,); k ≥ 1: y has shape (n, k).
    label_dim: Mapped[int] = mapped_column(Integer)
    x_data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    y_data: Mapped[bytes] = mapped_column(LargeBinary, deferred=True)
    checksum: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    report: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
