"""Joining or starting the Ray cluster the dispatcher drives."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

from services.settings import Settings

log = logging.getLogger(__name__)


LOCAL_GCS_TIMEOUT_S = 5


def connect(settings: Settings) -> bool:
    """``ray.init`` for ``settings``; True if this call started the connection (and owns it).

    ``ray.init`` replaces the process's SIGTERM/SIGINT handlers; the server's own are put back so
    uvicorn still shuts down gracefully (and the dispatcher re-queues its runs). A local Ray
    binds to loopback only; its processes are recorded in ``<data_dir>/ray-processes.json`` so
    that those a killed service left behind (Ray's agents outlive a SIGKILLed driver) are
    stopped at the next start.
    """
    import ray

    if ray.is_initialized():
        return False
    in_main = threading.current_thread() is threading.main_thread()
    saved = (
        {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if in_main else {}
    )
    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=False)
    else:
        record = settings.data_dir / "ray-processes.json"
        stop_leftovers(record)
        with without_secrets():  # Ray's processes, and the runs, inherit this environment
            ray.init(
                num_cpus=settings.ray_num_cpus,
                include_dashboard=False,
                log_to_driver=False,
                _node_ip_address="127.0.0.1",
                # Its GCS is this process's child: gone (a SIGTERM to the whole process group,
                # as systemd sends) it never comes back, and Ray's default 60 s of reconnecting
                # held the service's shutdown that long.
                _system_config={"gcs_rpc_server_reconnect_timeout_s": LOCAL_GCS_TIMEOUT_S},
            )
        remember_processes(record)
        private_token_file()
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    return True


SECRET_VARIABLES = ("OVERPARAM_DATABASE_URL", "PGPASSWORD", "DATABASE_URL")


@contextlib.contextmanager
def without_secrets() -> Iterator[None]:
    """The process's environment without the database's URL (and password) while Ray starts
    the processes that run the training code: they need neither."""
    saved = {name: os.environ.pop(name) for name in SECRET_VARIABLES if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


def private_token_file() -> None:
    """Ray writes its token auth secret world-readable (0644): make it the user's only."""
    token = Path.home() / ".ray" / "auth_token"
    if token.exists() and token.stat().st_mode & 0o077:
        token.chmod(0o600)


def disconnect(settings: Settings | None = None) -> None:
    import ray

    ray.shutdown()
    if settings is not None and not settings.ray_address:
        (settings.data_dir / "ray-processes.json").unlink(missing_ok=True)


def remember_processes(record: Path) -> None:
    """Write the pid and start time of every process this one started (Ray's, now)."""
    import psutil

    children = psutil.Process().children(recursive=True)
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps([[p.pid, p.create_time()] for p in children]))


def stop_leftovers(record: Path) -> None:
    """Kill the recorded processes of a previous local Ray that still run (same pid and start
    time: never a process that merely reused a pid)."""
    import psutil

    if not record.exists():
        return
    with contextlib.suppress(ValueError, OSError):
        for pid, started in json.loads(record.read_text()):
            with contextlib.suppress(psutil.Error):
                process = psutil.Process(pid)
                if abs(process.create_time() - started) < 1e-3:
                    log.warning(
                        "stopping %s (pid %d), left by a service that died", process.name(), pid
                    )
                    process.kill()
    record.unlink(missing_ok=True)
