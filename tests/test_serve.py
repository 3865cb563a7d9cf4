"""``overparam serve`` as a user runs it (a real process, SQLite, local Ray): a second service on
the same database refuses to start and leaves the first one's runs alone; a taken port is
refused before the database or Ray is touched; the Ray processes a SIGKILLed service leaves
behind are stopped by the next start."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.deploy.topology import free_port

pytestmark = pytest.mark.slow

OVERPARAM = [sys.executable, "-m", "overparam.cli"]
LONG = {"base": {"data": {"n": 8, "d": 4}, "width": 16, "steps": 1_000_000}}


def start(
    data_dir: Path, port: int, cpus: int = 1, log: Path | None = None
) -> subprocess.Popen[bytes]:
    """``overparam serve`` on ``data_dir``; its output is piped (for short checks) or appended
    to ``log`` (a long-lived service: nobody reads the pipe, and a full pipe blocks it)."""
    env = os.environ | {
        "OVERPARAM_DATA_DIR": str(data_dir),
        "OVERPARAM_CHECKPOINT_DIR": str(data_dir / "checkpoints"),
        "OVERPARAM_RAY_NUM_CPUS": str(cpus),
        "OVERPARAM_DATABASE_URL": f"sqlite:///{data_dir}/overparam.db",
    }
    command = [*OVERPARAM, "serve", "--port", str(port)]
    out = subprocess.PIPE if log is None else log.open("ab")
    return subprocess.Popen(
        command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
    )


def stop(process: subprocess.Popen[bytes], log: Path | None = None) -> None:
    """SIGTERM to the service's process group (its local Ray's processes too, as systemd
    stops a service): it must be gone within 60 s, else it is killed and this fails."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            tail = log.read_text()[-3000:] if log is not None else ""
            raise AssertionError(f"did not stop within 60 s of SIGTERM:\n{tail}") from None


def wait_ready(url: str, process: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, process.stdout.read().decode() if process.stdout else "gone"
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"{url} never became ready")


def output(process: subprocess.Popen[bytes], timeout: float) -> tuple[int, str]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out.decode()


@pytest.fixture
def first(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    port = free_port()
    process = start(tmp_path, port)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(url, process)
        yield process, url
    finally:
        stop(process)


def test_a_second_service_on_the_same_database_refuses_to_start(first, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    process, url = first
    run_id = httpx.post(f"{url}/api/v1/sweeps", json=LONG).json()["run_ids"][0]
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/api/v1/runs/{run_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    code, said = output(start(tmp_path, free_port()), timeout=60)
    assert code != 0 and f"another overparam service (pid {process.pid})" in said
    run = httpx.get(f"{url}/api/v1/runs/{run_id}").json()
    assert (run["status"], run["attempt"]) == ("running", 1), "the first one's run was left alone"
    port = int(url.rsplit(":", 1)[1])
    began = time.monotonic()
    code, said = output(start(tmp_path / "other", port), timeout=30)
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}" in said
    assert time.monotonic() - began < 15, "refused before starting Ray"
    assert not (tmp_path / "other" / "overparam.db").exists(), "the database was not touched"


def test_ray_processes_a_killed_service_left_are_stopped_by_the_next_start(first, tmp_path) -> None:  # type: ignore[no-untyped-def]
    process, _ = first
    record = tmp_path / "ray-processes.json"
    assert record.exists()
    ours = psutil.Process(process.pid).children(recursive=True)
    os.kill(process.pid, signal.SIGKILL)  # `kill -9` of the service itself
    process.wait(10)
    time.sleep(2)
    left = [p for p in ours if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    port = free_port()
    second = start(tmp_path, port)
    try:
        wait_ready(f"http://127.0.0.1:{port}", second)
        still = [p for p in left if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not still, f"left running: {[(p.pid, p.name()) for p in still]}"
    finally:
        os.killpg(second.pid, signal.SIGTERM)
        second.wait(60)


def test_the_embedded_ray_is_private(first) -> None:  # type: ignore[no-untyped-def]
    """Ray's token file is the user's only, and the processes that run the training code do not
    inherit the database's URL. (Ray 2.60 binds some of its ports to every interface whatever
    the node's address: the token, now private, is what guards them; docs/deploy.md.)"""
    process, url = first
    run_id = httpx.post(f"{url}/api/v1/sweeps", json=LONG).json()["run_ids"][0]
    deadline = time.monotonic() + 60
    while httpx.get(f"{url}/api/v1/runs/{run_id}").json()["status"] != "running":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    ray = psutil.Process(process.pid).children(recursive=True)
    assert ray, "a local Ray runs"
    for child in ray:
        with contextlib.suppress(psutil.Error):
            assert "OVERPARAM_DATABASE_URL" not in child.environ(), child.name()
    token = Path.home() / ".ray" / "auth_token"
    if token.exists():
        assert token.stat().st_mode & 0o077 == 0, oct(token.stat().st_mode)


def test_the_banner_shows_no_password() -> None:
    from overparam.cli import banner
    from services.settings import Settings

    settings = Settings(database_url="postgresql://lab:s3cret@db.example/overparam", auth="off")
    shown = banner(settings, "127.0.0.1", 8000)
    assert "s3cret" not in shown and "lab:***@db.example" in shown
