"""dispatcher heartbeats (with the cluster's nodes) and per-run resource requests

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "dispatcher",
        sa.Column("id", sa.String(length=128), nullable=False),
        sa.Column("host", sa.String(length=255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("leader", sa.Boolean(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("heartbeat_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("nodes", JSON, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dispatcher")),
    )
    with op.batch_alter_table("run") as batch:
        batch.add_column(sa.Column("resources", JSON, nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("run") as batch:
        batch.drop_column("resources")
    op.drop_table("dispatcher")
