"""Joining or starting the Ray cluster the dispatcher drives."""

from __future__ import annotations

import signal
import threading

from services.settings import Settings


def connect(settings: Settings) -> bool:
    """``ray.init`` for ``settings``; True if this call started the connection (and owns it).

    ``ray.init`` replaces the process's SIGTERM/SIGINT handlers; the server's own are put back so
    uvicorn still shuts down gracefully (and the dispatcher re-queues its runs).
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
        ray.init(num_cpus=settings.ray_num_cpus, include_dashboard=False, log_to_driver=False)
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    return True


def disconnect() -> None:
    import ray

    ray.shutdown()
