"""What both benchmarks share: databases, the two servers, timing and tables.

Each backend gets fresh databases of its own — a SQLite file, or a PostgreSQL database on the
local server (created here, dropped at the end; nothing else is touched) — one for overparam
and one for MLflow. Both servers run as subprocesses with one uvicorn worker and are stopped
before the next phase, so a measurement never shares the CPUs with the other server.

MLflow (3.17.2) lives in its own virtualenv, ``.venv-mlflow`` next to ``.venv``, created on
first use (``python3 -m venv .venv-mlflow && .venv-mlflow/bin/pip install mlflow==3.17.2
'psycopg[binary]'``); it is never installed into ``.venv``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
MLFLOW_VENV = Path(os.environ.get("OVERPARAM_MLFLOW_VENV", ROOT / ".venv-mlflow"))
MLFLOW_REQUIREMENTS = ["mlflow==3.17.2", "psycopg[binary]>=3.2,<4"]
PG_ADMIN_URL = os.environ.get(
    "OVERPARAM_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)


@dataclass(frozen=True)
class Backend:
    name: str  # "sqlite" or "postgresql"
    ours: str  # SQLAlchemy URL of overparam's database
    mlflow: str  # SQLAlchemy URL of MLflow's database


def ensure_mlflow() -> Path:
    """The ``mlflow`` executable of the separate virtualenv (created on first use)."""
    executable = MLFLOW_VENV / "bin" / "mlflow"
    if not executable.exists():
        print(f"installing {' '.join(MLFLOW_REQUIREMENTS)} into {MLFLOW_VENV}", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(MLFLOW_VENV)], check=True)
        pip = [str(MLFLOW_VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
        subprocess.run([*pip, *MLFLOW_REQUIREMENTS], check=True)
    return executable


@contextlib.contextmanager
def backends(names: list[str]) -> Iterator[list[Backend]]:
    """Fresh databases for each backend; removed afterwards."""
    workdir = Path(tempfile.mkdtemp(prefix="overparam-bench-"))
    created: list[str] = []
    out = []
    try:
        for name in names:
            if name == "sqlite":
                out.append(
                    Backend(name, f"sqlite:///{workdir}/ours.db", f"sqlite:///{workdir}/mlflow.db")
                )
            else:
                tag = uuid.uuid4().hex[:8]
                ours, theirs = f"overparam_bench_{tag}_ours", f"overparam_bench_{tag}_mlflow"
                admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
                with admin.connect() as conn:
                    for db in (ours, theirs):
                        conn.execute(text(f'CREATE DATABASE "{db}"'))
                        created.append(db)
                admin.dispose()
                base = PG_ADMIN_URL.rsplit("/", 1)[0]
                out.append(Backend(name, f"{base}/{ours}", f"{base}/{theirs}"))
        yield out
    finally:
        if created:
            admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
            with admin.connect() as conn:
                for db in created:
                    conn.execute(text(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
            admin.dispose()
        shutil.rmtree(workdir, ignore_errors=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def serving(command: list[str], env: dict[str, str], port: int, probe: str) -> Iterator[str]:
    """Run a server command in its own process group until the block ends."""
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            command,
            env=os.environ | env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            yield _wait_until_up(process, log, f"http://127.0.0.1:{port}", probe)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


def _wait_until_up(process: subprocess.Popen[bytes], log: IO[bytes], url: str, probe: str) -> str:
    for _ in range(600):
        if process.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"{process.args} exited:\n{log.read().decode()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + probe, timeout=2).status_code == 200:
                return url
        time.sleep(0.5)
    raise RuntimeError(f"{process.args} did not come up")


def serve_ours(database_url: str) -> contextlib.AbstractContextManager[str]:
    """overparam's API (no dispatcher) on ``database_url``, migrated first."""
    from services.migrate import upgrade

    upgrade(database_url)
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {
        "OVERPARAM_DATABASE_URL": database_url,
        "OVERPARAM_EMBEDDED_DISPATCHER": "false",
        "OVERPARAM_AUTH": "off",  # the laptop's service, as MLflow's (no auth)
    }
    return serving(command, env | {"PYTHONPATH": str(ROOT)}, port, "/livez")


def serve_mlflow(database_url: str, artifacts: str) -> contextlib.AbstractContextManager[str]:
    """An MLflow tracking server on ``database_url`` (one worker, background jobs off)."""
    port = free_port()
    command = [str(ensure_mlflow()), "server", "--backend-store-uri", database_url]
    command += ["--default-artifact-root", artifacts, "--host", "127.0.0.1"]
    command += ["--port", str(port), "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    return serving(command, env, port, "/health")


def mlflow_run(http: httpx.Client) -> str:
    experiment = http.post(
        "/api/2.0/mlflow/experiments/create", json={"name": f"bench-{uuid.uuid4().hex[:8]}"}
    ).json()["experiment_id"]
    created = http.post("/api/2.0/mlflow/runs/create", json={"experiment_id": experiment})
    return str(created.json()["run"]["info"]["run_id"])


def median_seconds(fn: Callable[[], object], reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def print_table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(cell)) for cell in column) for column in zip(headers, *rows, strict=True)]
    line = "  ".join(f"{{:<{w}}}" for w in widths)
    print(f"\n{title}")
    print(line.format(*headers))
    print(line.format(*("-" * w for w in widths)))
    for row in rows:
        print(line.format(*row))
    sys.stdout.flush()
