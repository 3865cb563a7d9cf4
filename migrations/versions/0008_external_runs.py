"""external runs: their own name and tags; experiments (sweeps of kind "experiment")

Adds ``name`` and ``tags`` on runs (an external run keeps the name its script gave, and string
tags; its params are its config), and ``kind`` on sweeps: ``grid`` (every sweep so far) or
``experiment``, a named group of external runs that grows as runs join it, one per owner and
name (a partial unique index).

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-28
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
EXPERIMENT = sa.text("kind = 'experiment'")


def upgrade() -> None:
    op.add_column("run", sa.Column("name", sa.String(length=200), nullable=True))
    op.add_column("run", sa.Column("tags", JSON, nullable=False, server_default="{}"))
    op.add_column(
        "sweep", sa.Column("kind", sa.String(length=16), nullable=False, server_default="grid")
    )
    op.create_index(
        "uq_sweep_experiment",
        "sweep",
        ["owner_id", "name"],
        unique=True,
        sqlite_where=EXPERIMENT,
        postgresql_where=EXPERIMENT,
    )


def downgrade() -> None:
    op.drop_index("uq_sweep_experiment", table_name="sweep")
    op.drop_column("sweep", "kind")
    op.drop_column("run", "tags")
    op.drop_column("run", "name")
