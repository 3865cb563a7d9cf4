"""lab users and API tokens, owners, fair-share priorities, stored points per run, audit

Adds ``lab_user`` (with the built-in ``local`` admin, who owns everything created while
authentication is off, including everything stored before this revision), ``api_token`` (SHA-256
digests only) and ``audit_event``; ``owner_id`` on sweeps, runs and datasets; ``priority`` on
sweeps and their runs; ``points`` on runs (their stored metric points, for quotas), backfilled
from the chunks.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-28
"""

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
OWNED = ("sweep", "run", "dataset")


def upgrade() -> None:
    users = op.create_table(
        "lab_user",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("quotas", JSON, nullable=False),
        sa.Column("share", sa.Double(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("role IN ('admin', 'member')", name=op.f("ck_lab_user_role")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lab_user")),
        sa.UniqueConstraint("name", name=op.f("uq_lab_user_name")),
    )
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("digest", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=12), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["lab_user.id"],
            name=op.f("fk_api_token_user_id_lab_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
        sa.UniqueConstraint("digest", name=op.f("uq_api_token_digest")),
    )
    op.create_index(op.f("ix_api_token_user_id"), "api_token", ["user_id"], unique=False)
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=True),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target", sa.String(length=64), nullable=False),
        sa.Column("detail", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_event")),
    )
    op.create_index(op.f("ix_audit_event_at"), "audit_event", ["at"], unique=False)
    op.create_index(op.f("ix_audit_event_user_id"), "audit_event", ["user_id"], unique=False)
    now = datetime.now(UTC)
    op.bulk_insert(
        users,
        [
            {
                "id": 1,
                "name": "local",
                "role": "admin",
                "quotas": {},
                "share": 1.0,
                "created_at": now,
            }
        ],
    )
    if op.get_bind().dialect.name == "postgresql":  # the next ids after the one inserted
        op.execute("SELECT setval('lab_user_id_seq', 1)")
    # Plain ALTER TABLE on both dialects (batch mode would recreate ``run`` on SQLite).
    for table in OWNED:
        op.add_column(table, sa.Column("owner_id", sa.Integer(), nullable=True))
        op.create_index(op.f(f"ix_{table}_owner_id"), table, ["owner_id"], unique=False)
        op.execute(f"UPDATE {table} SET owner_id = 1")
    for table in ("sweep", "run"):
        op.add_column(
            table, sa.Column("priority", sa.Integer(), server_default="0", nullable=False)
        )
    op.add_column("run", sa.Column("points", sa.BigInteger(), server_default="0", nullable=False))
    op.execute(
        "UPDATE run SET points = (SELECT coalesce(sum(c.count), 0) FROM metric_chunk c "
        "WHERE c.run_id = run.id)"
    )


def downgrade() -> None:
    op.drop_column("run", "points")
    for table in ("sweep", "run"):
        op.drop_column(table, "priority")
    for table in OWNED:
        op.drop_index(op.f(f"ix_{table}_owner_id"), table_name=table)
        op.drop_column(table, "owner_id")
    op.drop_index(op.f("ix_audit_event_user_id"), table_name="audit_event")
    op.drop_index(op.f("ix_audit_event_at"), table_name="audit_event")
    op.drop_table("audit_event")
    op.drop_index(op.f("ix_api_token_user_id"), table_name="api_token")
    op.drop_table("api_token")
    op.drop_table("lab_user")
