"""The schema: sweeps, runs, normalized metric names, metric histories as chunks, datasets.

A metric history is stored in the shape of the data: chunks of steps and values with their
summary (``MetricChunk``), one row per (run, metric, block of points), written and read whole.
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
    String,
    Text,
    TypeDecorator,
    false,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

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


USER_ROLES = ("admin", "member")
LOCAL_USER = "local"  # owns everything while authentication is off (the laptop default)


class User(Base):
    """A member of the lab. ``quotas`` overrides the settings' defaults for this user (admins
    set it); ``share`` weighs the user's part of the cluster's slots (fair share)."""

    __tablename__ = "lab_user"
    __table_args__ = (CheckConstraint(f"role IN {USER_ROLES!r}", name="role"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16), default="member")
    quotas: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    share: Mapped[float] = mapped_column(Double, default=1.0)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class ApiToken(Base):
    """An API token: only its SHA-256 is stored (tokens are random, 256 bits: no slow hash
    needed); shown once, revocable, with the time it was last used."""

    __tablename__ = "api_token"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("lab_user.id", ondelete="CASCADE"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(12))  # the token's start, to recognize it
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class AuditEvent(Base):
    """Who did what to which object, and when (written in the action's own transaction)."""

    __tablename__ = "audit_event"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(Integer, index=True)
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(64))  # "sweep:3", "run:17", "user:alice"
    detail: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)


class Owned:
    """An object a lab user owns: ``owner`` is the owner's name (one query for a whole list)."""

    owner_user: Mapped[User | None]

    @property
    def owner(self) -> str | None:
        return self.owner_user.name if self.owner_user is not None else None


def _owner_of(model: str) -> Any:
    return relationship(
        User, primaryjoin=f"foreign({model}.owner_id) == User.id", lazy="selectin", viewonly=True
    )


SWEEP_KINDS = ("grid", "experiment")


class Sweep(Owned, Base):
    """A grid of runs from a spec (``grid``), or an ``experiment``: a named group of external
    runs that grows as runs join it (one per owner and name; its spec holds no grid)."""

    __tablename__ = "sweep"
    __table_args__ = (
        Index(
            "uq_sweep_experiment",
            "owner_id",
            "name",
            unique=True,
            sqlite_where=text("kind = 'experiment'"),
            postgresql_where=text("kind = 'experiment'"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(Integer, index=True)  # a lab_user, never deleted
    owner_user: Mapped[User | None] = _owner_of("Sweep")
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    name: Mapped[str] = mapped_column(String(200))
    spec: Mapped[dict[str, Any]] = mapped_column(JsonType)
    run_count: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(16), default="grid", server_default="grid")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class Run(Owned, Base):
    __tablename__ = "run"
    __table_args__ = (
        CheckConstraint(f"status IN {RUN_STATUSES!r}", name="status"),
        Index("ix_run_status_id", "status", "id"),
        Index("ix_run_sweep_id_id", "sweep_id", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("sweep.id", ondelete="CASCADE"))
    owner_id: Mapped[int | None] = mapped_column(Integer, index=True)  # a lab_user, never deleted
    owner_user: Mapped[User | None] = _owner_of("Run")
    # The dispatcher picks runs by fair share across owners, then by priority (the sweep's).
    priority: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    points: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")  # stored
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
    name: Mapped[str | None] = mapped_column(String(200))  # an external run's own name
    tags: Mapped[dict[str, str]] = mapped_column(JsonType, default=dict)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime())
    # The resolved request (services.resources.ResourceRequest.as_dict()); {} = estimate it.
    resources: Mapped[dict[str, Any]] = mapped_column(JsonType, default=dict)
    # Why a queued run fits no node of the cluster (the dispatcher skips it until one joins).
    blocked_reason: Mapped[str | None] = mapped_column(Text)


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


STEP = BigInteger().with_variant(Integer(), "sqlite")  # SQLite's INTEGER is 64-bit already


class MetricChunk(Base):
    """A block of one metric history: up to ``services.chunks.CHUNK_POINTS`` points.

    ``step_array`` and ``value_array`` hold the steps (int64) and values (float64) as
    little-endian bytes, in step order; the other columns summarize them: first/last step,
    count, first/last value and the lowest/highest value with its step (NaN ignored; NULL
    when every value is NaN, and NaN in these columns is NULL on both backends). The chunks
    of one (run, metric) never overlap in steps, so the key orders them by step. No foreign
    keys: checking them costs every write, and deleting a run must delete its chunks.
    """

    __tablename__ = "metric_chunk"

    run_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    metric_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    last_step: Mapped[int] = mapped_column(STEP, primary_key=True)
    first_step: Mapped[int] = mapped_column(STEP)
    count: Mapped[int] = mapped_column(Integer)
    first_value: Mapped[float | None] = mapped_column(Double)
    last_value: Mapped[float | None] = mapped_column(Double)
    min_step: Mapped[int] = mapped_column(STEP)
    min_value: Mapped[float | None] = mapped_column(Double)
    max_step: Mapped[int] = mapped_column(STEP)
    max_value: Mapped[float | None] = mapped_column(Double)
    step_array: Mapped[bytes] = mapped_column(LargeBinary)
    value_array: Mapped[bytes] = mapped_column(LargeBinary)


class IdempotencyKey(Base):
    """A creating request's ``Idempotency-Key``: the request's hash and the answer it got."""

    __tablename__ = "idempotency_key"

    scope: Mapped[str] = mapped_column(String(300), primary_key=True)  # route (and user)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[int | None] = mapped_column(Integer)
    response: Mapped[Any | None] = mapped_column(JsonType)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)


class Dataset(Owned, Base):
    """Uploaded training data: X (n, d) and y (n,) or (n, k), float64 little-endian bytes."""

    __tablename__ = "dataset"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    owner_id: Mapped[int | None] = mapped_column(Integer, index=True)  # a lab_user, never deleted
    owner_user: Mapped[User | None] = _owner_of("Dataset")
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
