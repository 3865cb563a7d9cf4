"""``GET /metrics``: Prometheus's text format (docs/deploy.md lists every series).

Who may scrape: with ``OVERPARAM_METRICS_TOKEN`` set, whoever sends it as a bearer token;
without it, anyone when API tokens are off (the laptop), nobody when they are required (the
series name the lab's users). The Host check of the API applies (DNS rebinding).

Several uvicorn workers (``PROMETHEUS_MULTIPROC_DIR`` set): the answer adds up the files of
every worker, so whichever worker answers, the counts are the service's; gauges of processes
that are gone are dropped first. One process: its own registry. Either way the state of the
database and the cluster is read now (``services/state_metrics.py``).
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest, multiprocess
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from api.auth import bearer, check_host
from services.state_metrics import ServiceState
from services.users import Unauthenticated

router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    """The service's series in Prometheus's text format."""
    check_host(request)
    check_scraper(request)
    sources = [process_metrics(), ServiceState(request.app.state.sessions)]
    return Response(generate_latest(Sources(sources)), media_type=CONTENT_TYPE_LATEST)


def check_scraper(request: Request) -> None:
    settings = request.app.state.settings
    given = bearer(request) or ""
    # An empty token is none (compose passes ${METRICS_TOKEN:-}): it must never match no header.
    expected = settings.metrics_token.get_secret_value() if settings.metrics_token else ""
    if expected:
        if hmac.compare_digest(given.encode(), expected.encode()):
            return
        raise Unauthenticated("/metrics needs OVERPARAM_METRICS_TOKEN: Authorization: Bearer <it>")
    if request.app.state.auth != "off":
        raise Unauthenticated(
            "/metrics is closed while API tokens are required: set OVERPARAM_METRICS_TOKEN "
            "and give Prometheus the same token"
        )


def process_metrics() -> Collector:
    """This service's processes' instruments: all workers' files, or this process's registry."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    forget_dead_processes(Path(directory))
    return multiprocess.MultiProcessCollector(None, path=directory)


def forget_dead_processes(directory: Path) -> None:
    """Drop the live-summed gauges of workers that are gone (uvicorn replaces a dead worker;
    its connections and subscribers went with it). Counters keep every worker's counts."""
    for path in directory.glob("gauge_live*_*.db"):
        pid = path.stem.rsplit("_", 1)[1]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            multiprocess.mark_process_dead(int(pid), str(directory))
        except PermissionError:  # alive, someone else's
            pass


class Sources:
    """Several collectors as one registry for ``generate_latest``."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self.collectors = list(collectors)

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()
