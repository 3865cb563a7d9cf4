"""metric histories as chunks: metric_chunk replaces metric, its rollups and the write-behind tables

Every stored point moves into ``metric_chunk`` rows of up to 1,024 points per (run, metric),
in step order (the steps and values as little-endian int64/float64 bytes, with each chunk's
summary); then ``metric``, ``metric_rollup``, ``metric_rollup_pending`` and
``metric_batch_queue`` are dropped. The downgrade moves the points back into ``metric`` and
rebuilds the rollups with revision 0003's backfill.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import importlib.util
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STEP = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
CHUNK_POINTS = 1024  # services.chunks.CHUNK_POINTS when this revision was written
READ_ROWS = 50_000


def upgrade() -> None:
    op.create_table(
        "metric_chunk",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("last_step", STEP, nullable=False),
        sa.Column("first_step", STEP, nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.Column("first_value", sa.Double(), nullable=True),
        sa.Column("last_value", sa.Double(), nullable=True),
        sa.Column("min_step", STEP, nullable=False),
        sa.Column("min_value", sa.Double(), nullable=True),
        sa.Column("max_step", STEP, nullable=False),
        sa.Column("max_value", sa.Double(), nullable=True),
        sa.Column("step_array", sa.LargeBinary(), nullable=False),
        sa.Column("value_array", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("run_id", "metric_id", "last_step", name=op.f("pk_metric_chunk")),
    )
    bind = op.get_bind()
    if bind.dialect.name == "postgresql":
        # Out of line and uncompressed: numbers barely compress, and pglz costs every write.
        for column in ("step_array", "value_array"):
            op.execute(f"ALTER TABLE metric_chunk ALTER COLUMN {column} SET STORAGE EXTERNAL")
    table = sa.table("metric_chunk", *(sa.column(c) for c in _CHUNK_COLUMNS))
    batch: list[dict[str, Any]] = []
    for row in _chunks(bind):
        batch.append(row)
        if len(batch) >= 100:
            bind.execute(table.insert(), batch)
            batch = []
    if batch:
        bind.execute(table.insert(), batch)
    op.drop_table("metric_batch_queue")
    op.drop_table("metric_rollup_pending")
    op.drop_table("metric_rollup")
    op.drop_table("metric")


_CHUNK_COLUMNS = (
    "run_id",
    "metric_id",
    "last_step",
    "first_step",
    "count",
    "first_value",
    "last_value",
    "min_step",
    "min_value",
    "max_step",
    "max_value",
    "step_array",
    "value_array",
)


def _chunks(bind: sa.Connection) -> Iterator[dict[str, Any]]:
    """The stored points as chunk rows, read in key order in pieces (NULL was NaN)."""
    query = "SELECT run_id, metric_id, step, value FROM metric ORDER BY run_id, metric_id, step"
    points = bind.execute(sa.text(query).execution_options(stream_results=True))
    key: tuple[int, int] | None = None
    steps: list[int] = []
    values: list[float] = []
    for part in points.partitions(READ_ROWS):
        for run_id, metric_id, step, value in part:
            if (run_id, metric_id) != key or len(steps) == CHUNK_POINTS:
                if key is not None:
                    yield _chunk_row(key, steps, values)
                key, steps, values = (run_id, metric_id), [], []
            steps.append(step)
            values.append(np.nan if value is None else value)
    if key is not None:
        yield _chunk_row(key, steps, values)


def _chunk_row(key: tuple[int, int], step_list: list[int], value_list: list[float]) -> dict:
    steps = np.array(step_list, dtype="<i8")
    values = np.array(value_list, dtype="<f8")
    defined = ~np.isnan(values)
    low = int(np.nanargmin(values)) if defined.any() else 0
    high = int(np.nanargmax(values)) if defined.any() else 0

    def summary(index: int) -> float | None:
        return float(values[index]) if defined[index] else None

    return dict(
        zip(
            _CHUNK_COLUMNS,
            (
                *key,
                int(steps[-1]),
                int(steps[0]),
                len(steps),
                summary(0),
                summary(-1),
                int(steps[low]),
                summary(low),
                int(steps[high]),
                summary(high),
                steps.tobytes(),
                values.tobytes(),
            ),
            strict=True,
        )
    )


def downgrade() -> None:
    op.create_table(
        "metric",
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("metric_id", sa.Integer(), nullable=False),
        sa.Column("step", STEP, nullable=False),
        sa.Column("value", sa.Double(), nullable=True),
        sa.PrimaryKeyConstraint("run_id", "metric_id", "step", name=op.f("pk_metric")),
        sqlite_with_rowid=False,
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
        sa.PrimaryKeyConstraint(
            "run_id", "metric_id", "level", "bucket", name=op.f("pk_metric_rollup")
        ),
        sqlite_with_rowid=False,
    )
    _revision_0004().create_write_behind_tables()
    bind = op.get_bind()
    metric = sa.table("metric", *(sa.column(c) for c in ("run_id", "metric_id", "step", "value")))
    chunks = bind.execute(
        sa.text("SELECT run_id, metric_id, step_array, value_array FROM metric_chunk")
    )
    for run_id, metric_id, step_bytes, value_bytes in chunks:
        steps = np.frombuffer(step_bytes, "<i8").tolist()
        values = np.frombuffer(value_bytes, "<f8").tolist()
        rows = [
            {"run_id": run_id, "metric_id": metric_id, "step": s, "value": None if v != v else v}
            for s, v in zip(steps, values, strict=True)
        ]
        bind.execute(metric.insert(), rows)
    _revision_0003().backfill_rollups()
    op.drop_table("metric_chunk")


def _revision(file: str) -> Any:
    path = Path(__file__).with_name(file)
    spec = importlib.util.spec_from_file_location(f"_overparam_revision_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _revision_0003() -> Any:
    return _revision("0003_metric_store.py")


def _revision_0004() -> Any:
    return _revision("0004_deferred_writes.py")
