"""metric store: external runs, metric rollups for downsampling, datasets; points without FKs

``metric`` loses its two foreign keys: checking them costs PostgreSQL two index probes and a
row lock per point (binary COPY ran at about 40% of its speed without them). Points are only
written through ``services.metrics.write_points``, whose callers have the run, and metric ids
come from ``metric_name``; whoever deletes runs deletes their points (rollups still cascade).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
STEP = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
ROLLUP_LEVELS = 12  # services.metrics.ROLLUP_LEVELS when this revision was written


METRIC_FKS = (
    ("fk_metric_run_id_run", "run", "run_id", "CASCADE"),
    ("fk_metric_metric_id_metric_name", "metric_name", "metric_id", None),
)


def upgrade() -> None:
    # SQLite recreates the table (keeping it WITHOUT ROWID); PostgreSQL just drops them.
    with op.batch_alter_table("metric", table_kwargs={"sqlite_with_rowid": False}) as batch:
        for name, *_ in METRIC_FKS:
            batch.drop_constraint(name, type_="foreignkey")
    # Plain ALTER TABLE on both dialects: batch mode would recreate ``run`` on SQLite, and
    # dropping the old table with foreign keys on cascades into every metric point.
    op.add_column(
        "run", sa.Column("external", sa.Boolean(), nullable=False, server_default=sa.false())
    )
    op.create_table(
        "metric_rollup",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("bucket", STEP, nullable=False),
        sa.Column("min_step", STEP, nullable=False),
        sa.Column("min_value", sa.Double(), nullable=True),
        sa.Column("max_step", STEP, nullable=False),
        sa.Column("max_value", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["metric_id"], ["metric_name.id"], name=op.f("fk_metric_rollup_metric_id_metric_name")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["run.id"], name=op.f("fk_metric_rollup_run_id_run"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint(
            "run_id", "metric_id", "level", "bucket", name=op.f("pk_metric_rollup")
        ),
        sqlite_with_rowid=False,
    )
    op.create_table(
        "dataset",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.Column("d", sa.Integer(), nullable=False),
        sa.Column("label_dim", sa.Integer(), nullable=False),
        sa.Column("x_data", sa.LargeBinary(), nullable=False),
        sa.Column("y_data", sa.LargeBinary(), nullable=False),
        sa.Column("checksum", sa.String(length=64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("report", JSON, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dataset")),
    )
    backfill_rollups()


def backfill_rollups() -> None:
    """Rollups of the points stored before this revision, so their histories downsample too.
    The level-0 rows come from the points, every higher level from the level below.

    On PostgreSQL each source table is analyzed first: a table filled in this transaction has
    no statistics, and the planner's guess of a few rows joins the two halves of each level
    in a nested loop (50 s for 10,000 points instead of a fraction of a second)."""
    postgres = op.get_bind().dialect.name == "postgresql"
    for level in range(ROLLUP_LEVELS):
        if postgres:
            op.execute("ANALYZE metric" if level == 0 else "ANALYZE metric_rollup")
        op.execute(_rollup_sql(level))


def _rollup_sql(level: int) -> str:
    """The rows of ``level`` computed with window functions (both dialects have them)."""
    shift = 5 + 3 * level
    if level == 0:
        source = (
            "SELECT run_id, metric_id, step AS min_step, value AS min_value, "
            "step AS max_step, value AS max_value FROM metric"
        )
    else:
        source = (
            "SELECT run_id, metric_id, min_step, min_value, max_step, max_value "
            f"FROM metric_rollup WHERE level = {level - 1}"
        )
    # CASE WHEN v IS NULL THEN 1 ELSE 0 END orders NaN (NULL) after every number on both dialects.
    return f"""
        INSERT INTO metric_rollup
            (run_id, metric_id, level, bucket, min_step, min_value, max_step, max_value)
        SELECT lo.run_id, lo.metric_id, {level}, lo.bucket,
               lo.min_step, lo.min_value, hi.max_step, hi.max_value
        FROM (
            SELECT run_id, metric_id, bucket, min_step, min_value FROM (
                SELECT run_id, metric_id, min_step / {1 << shift} AS bucket, min_step, min_value,
                       ROW_NUMBER() OVER (
                           PARTITION BY run_id, metric_id, min_step / {1 << shift}
                           ORDER BY CASE WHEN min_value IS NULL THEN 1 ELSE 0 END,
                                    min_value, min_step
                       ) AS rank
                FROM ({source}) AS points
            ) AS ranked WHERE rank = 1
        ) AS lo
        JOIN (
            SELECT run_id, metric_id, bucket, max_step, max_value FROM (
                SELECT run_id, metric_id, max_step / {1 << shift} AS bucket, max_step, max_value,
                       ROW_NUMBER() OVER (
                           PARTITION BY run_id, metric_id, max_step / {1 << shift}
                           ORDER BY CASE WHEN max_value IS NULL THEN 1 ELSE 0 END,
                                    max_value DESC, max_step
                       ) AS rank
                FROM ({source}) AS points
            ) AS ranked WHERE rank = 1
        ) AS hi
        ON hi.run_id = lo.run_id AND hi.metric_id = lo.metric_id AND hi.bucket = lo.bucket
    """


def downgrade() -> None:
    op.drop_table("dataset")
    op.drop_table("metric_rollup")
    op.drop_column("run", "external")  # SQLite ≥ 3.35 drops a column in place
    with op.batch_alter_table("metric", table_kwargs={"sqlite_with_rowid": False}) as batch:
        for name, parent, column, ondelete in METRIC_FKS:
            batch.create_foreign_key(name, parent, [column], ["id"], ondelete=ondelete)
