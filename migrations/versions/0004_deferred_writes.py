"""metric_rollup without foreign keys, like metric; metric_rollup_pending; metric_batch_queue

Checking the foreign keys cost PostgreSQL two index probes per upserted rollup row, about a
third of the upsert. On PostgreSQL a batch no longer upserts its rollups at all: it inserts one
``metric_rollup_pending`` row that a background merger folds in (``services/rollups.py``).
REST batches on PostgreSQL are committed as one ``metric_batch_queue`` row each and moved into
``metric`` by the same background writer (write-behind; reads move what is queued first).
Rollups are only written for points of a run their writers hold; whoever deletes runs deletes
their points, rollups and pending rollups (nothing in the service deletes runs).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ROLLUP_FKS = (
    ("fk_metric_rollup_run_id_run", "run", "run_id", "CASCADE"),
    ("fk_metric_rollup_metric_id_metric_name", "metric_name", "metric_id", None),
)


STEP = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _array(item: sa.types.TypeEngine) -> sa.types.TypeEngine:
    return sa.JSON().with_variant(postgresql.ARRAY(item), "postgresql")


def upgrade() -> None:
    create_write_behind_tables()
    # SQLite recreates the table (keeping it WITHOUT ROWID); PostgreSQL just drops them.
    with op.batch_alter_table("metric_rollup", table_kwargs={"sqlite_with_rowid": False}) as batch:
        for name, *_ in ROLLUP_FKS:
            batch.drop_constraint(name, type_="foreignkey")


def create_write_behind_tables() -> None:
    op.create_table(
        "metric_rollup_pending",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("metric_ids", _array(sa.Integer()), nullable=False),
        sa.Column("levels", _array(sa.SmallInteger()), nullable=False),
        sa.Column("buckets", _array(sa.BigInteger()), nullable=False),
        sa.Column("min_steps", _array(sa.BigInteger()), nullable=False),
        sa.Column("min_values", _array(sa.Double()), nullable=False),
        sa.Column("max_steps", _array(sa.BigInteger()), nullable=False),
        sa.Column("max_values", _array(sa.Double()), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_rollup_pending")),
    )
    op.create_index(
        op.f("ix_metric_rollup_pending_run_id"), "metric_rollup_pending", ["run_id"], unique=False
    )
    op.create_table(
        "metric_batch_queue",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("metric_ids", _array(sa.Integer()), nullable=False),
        sa.Column("first_step", STEP, nullable=False),
        sa.Column("last_step", STEP, nullable=False),
        sa.Column("points", sa.Integer(), nullable=False),
        sa.Column("payload", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metric_batch_queue")),
    )
    op.create_index(
        op.f("ix_metric_batch_queue_run_id"), "metric_batch_queue", ["run_id"], unique=False
    )
    if op.get_bind().dialect.name == "postgresql":
        # Stored out of line uncompressed: compressing ~20 kB of numbers per batch costs more
        # than it saves in a table whose rows live for milliseconds.
        op.execute("ALTER TABLE metric_batch_queue ALTER COLUMN payload SET STORAGE EXTERNAL")


def downgrade() -> None:
    op.drop_index(op.f("ix_metric_batch_queue_run_id"), table_name="metric_batch_queue")
    op.drop_table("metric_batch_queue")
    op.drop_index(op.f("ix_metric_rollup_pending_run_id"), table_name="metric_rollup_pending")
    op.drop_table("metric_rollup_pending")
    with op.batch_alter_table("metric_rollup", table_kwargs={"sqlite_with_rowid": False}) as batch:
        for name, parent, column, ondelete in ROLLUP_FKS:
            batch.create_foreign_key(name, parent, [column], ["id"], ondelete=ondelete)
