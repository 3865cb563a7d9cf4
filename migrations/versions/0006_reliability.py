"""idempotency keys of creating requests; why a queued run is blocked

``idempotency_key`` holds, per route (and user) and ``Idempotency-Key`` header, the request's
hash and the answer it got (``services/idempotency.py``). ``run.blocked_reason`` says why a
queued run fits no node of the cluster; the dispatcher skips such runs until a node joins.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "idempotency_key",
        sa.Column("scope", sa.String(length=300), nullable=False),
        sa.Column("key", sa.String(length=255), nullable=False),
        sa.Column("request_sha256", sa.String(length=64), nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("response", JSON, nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("scope", "key", name=op.f("pk_idempotency_key")),
    )
    op.create_index(
        op.f("ix_idempotency_key_created_at"), "idempotency_key", ["created_at"], unique=False
    )
    # Plain ALTER TABLE on both dialects (batch mode would recreate ``run`` on SQLite).
    op.add_column("run", sa.Column("blocked_reason", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("run", "blocked_reason")  # SQLite ≥ 3.35 drops a column in place
    op.drop_index(op.f("ix_idempotency_key_created_at"), table_name="idempotency_key")
    op.drop_table("idempotency_key")
