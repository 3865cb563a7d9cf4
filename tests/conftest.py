"""Shared fixtures: SQLite and real PostgreSQL databases, one local Ray cluster per session,
and API clients. PostgreSQL tests create (and drop) their own databases; they skip when the
server is unreachable, unless OVERPARAM_REQUIRE_POSTGRES=1 (CI), where they fail.

Migrations run once per session and backend (tests/test_migrations.py runs them for real): a
SQLite test gets a copy of a migrated file, a PostgreSQL test the session's migrated database
emptied with ``DELETE`` and its sequences restarted (~4 ms; ``TRUNCATE … RESTART IDENTITY``
took ~0.1 s, ``CREATE DATABASE … TEMPLATE`` and its ``DROP`` ~0.9 s)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from api.main import create_app
from services.migrate import upgrade
from services.models import Base
from services.settings import Settings

# A pytest-xdist worker runs with COLUMNS=80 in its environment, which the CLI's module-level
# rich Console would keep for good; the CLI tests set COLUMNS per call, as in a serial run.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.pop("COLUMNS", None)

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


@pytest.fixture(scope="session")
def migrated_sqlite(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], str]:
    """``migrated_sqlite(path)`` puts a migrated, empty SQLite database at ``path`` (a copy of
    one migrated once per session) and returns its URL."""
    template = tmp_path_factory.mktemp("migrated") / "template.db"
    upgrade(f"sqlite:///{template}")
    # WAL: fold the log into the file (no connection is left open), so the file is the whole
    # database; each copy is in WAL mode like a database that ``overparam db upgrade`` made.
    conn = sqlite3.connect(template)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()

    def copy(path: Path) -> str:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"

    return copy


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    migrated_sqlite: Callable[[Path], str],
) -> str:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        return migrated_sqlite(tmp_path_factory.mktemp("db") / "overparam.db")
    url: str = request.getfixturevalue("pg_migrated_url")
    empty: Callable[[], None] = request.getfixturevalue("pg_emptier")
    empty()
    return url


@pytest.fixture(scope="session")
def pg_emptier(pg_migrated_url: str) -> Iterator[Callable[[], None]]:
    """Empties the session's migrated database as ``TRUNCATE … RESTART IDENTITY`` of every
    table but the built-in local user would, in a few ms: ``DELETE`` (children first), then
    restart the sequences of the emptied tables (``lab_user`` keeps its own: ``local`` stays)."""
    engine = create_engine(pg_migrated_url, poolclass=NullPool)
    tables = [t.name for t in reversed(Base.metadata.sorted_tables) if t.name != "lab_user"]
    with engine.connect() as conn:
        sequences = conn.execute(
            text(
                "SELECT seq.relname FROM pg_class seq"
                " JOIN pg_depend dep ON dep.objid = seq.oid AND dep.deptype IN ('a', 'i')"
                " JOIN pg_class tab ON tab.oid = dep.refobjid"
                " WHERE seq.relkind = 'S' AND tab.relname = ANY(:tables)"
            ),
            {"tables": tables},
        ).scalars()
        statements = [
            *(f'DELETE FROM "{table}"' for table in tables),
            "DELETE FROM lab_user WHERE name <> 'local'",
            *(f'ALTER SEQUENCE "{sequence}" RESTART' for sequence in sequences),
        ]

    def empty() -> None:
        with engine.begin() as conn:
            conn.execute(text("; ".join(statements)))

    yield empty
    engine.dispose()


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
