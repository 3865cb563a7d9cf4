"""Alembic on both backends: upgrade to head, schema equals the models, downgrade to base."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from services.db import make_engine
from services.migrate import downgrade, is_current, upgrade
from services.models import Base


def check_round_trip(url: str) -> None:
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
    downgrade(url, "base")
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(url)
    assert {"sweep", "run", "metric_chunk", "metric_name"} <= set(inspect(engine).get_table_names())
    engine.dispose()


def test_is_current_only_at_the_latest_revision(tmp_path) -> None:  # type: ignore[no-untyped-def]
    url = f"sqlite:///{tmp_path / 'm.db'}"
    assert not is_current(url), "an empty database"
    upgrade(url)
    assert is_current(url)
    downgrade(url, "-1")
    assert not is_current(url), "one revision behind"


def test_sqlite_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    check_round_trip(f"sqlite:///{tmp_path / 'm.db'}")


@pytest.mark.postgres
def test_is_current_on_postgres_with_a_plain_url(pg_empty_url: str) -> None:
    """The URL as a lab writes it (postgresql://, as in the Kubernetes Secret): psycopg 3, not
    SQLAlchemy's default psycopg2, which the image does not have."""
    url = pg_empty_url.replace("postgresql+psycopg://", "postgresql://")
    assert url.startswith("postgresql://")
    assert not is_current(url)
    upgrade(url)
    assert is_current(url)


@pytest.mark.postgres
def test_postgres_round_trip(pg_empty_url: str) -> None:
    check_round_trip(pg_empty_url)
