"""Shared fixtures: SQLite and real PostgreSQL databases, one local Ray cluster per session,
and API clients. PostgreSQL tests create (and drop) their own databases; they skip when the
server is unreachable, unless OVERPARAM_REQUIRE_POSTGRES=1 (CI), where they fail."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from api.main import create_app
from services.migrate import upgrade
from services.settings import Settings

PG_ADMIN_URL = os.environ.get(
    "OVERPARAM_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


def _pg_available() -> bool:
    try:
        with create_engine(PG_ADMIN_URL).connect() as conn:
            conn.execute(text("SELECT 1"))
        return True
    except Exception:
        return False


def create_pg_database() -> str:
    """A new, empty PostgreSQL database of our own; returns its URL."""
    if not _pg_available():
        if os.environ.get("OVERPARAM_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL is required but unreachable at {PG_ADMIN_URL}")
        pytest.skip(f"PostgreSQL unreachable at {PG_ADMIN_URL}")
    name = f"overparam_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"


def drop_pg_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    assert name.startswith("overparam_test_"), "only drop databases this suite created"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture
def pg_empty_url() -> Iterator[str]:
    url = create_pg_database()
    yield url
    drop_pg_database(url)


@pytest.fixture(scope="session")
def pg_migrated_url() -> Iterator[str]:
    url = create_pg_database()
    upgrade(url)
    yield url
    drop_pg_database(url)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'overparam.db'}"
        upgrade(url)
        return url
    url: str = request.getfixturevalue("pg_migrated_url")
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "TRUNCATE metric_chunk, run, sweep, metric_name, dataset, dispatcher,"
                " idempotency_key, api_token, audit_event RESTART IDENTITY CASCADE;"
                " DELETE FROM lab_user WHERE name <> 'local'"
            )
        )
    engine.dispose()
    return url


def make_settings(database_url: str, **overrides: object) -> Settings:
    """Settings of a test app: no embedded dispatcher, authentication off and any Host (the
    tests of those set them)."""
    defaults: dict[str, object] = {
        "embedded_dispatcher": False,
        "auth": "off",
        "allowed_hosts": ["*"],
    }
    return Settings(database_url=database_url, **(defaults | overrides))  # type: ignore[arg-type]


@pytest.fixture
def client(db_url: str) -> Iterator[TestClient]:
    """An API client without the dispatcher (no Ray)."""
    with TestClient(create_app(make_settings(db_url)), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the whole session (start-up takes seconds)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()
