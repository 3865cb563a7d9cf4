"""The FastAPI app factory. In the embedded default the lifespan also migrates the database,
connects Ray and runs the dispatcher (one process: ``overparam serve``)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI

from api import openapi, problems
from api.limits import BodySizeLimit
from api.routes import (
    analysis,
    dashboard,
    datasets,
    external_runs,
    health,
    metrics,
    runs,
    streams,
    sweeps,
)
from services.db import make_engine, make_sessionmaker
from services.manifest import package_version
from services.settings import Settings, get_settings
from services.streams import Hub

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = make_engine(settings.database_url)
    app.state.sessions = make_sessionmaker(engine)
    app.state.hub = Hub(app.state.sessions, settings.stream_poll_s)
    app.state.dispatcher = None
    stop = asyncio.Event()
    dispatcher_task = None
    owns_ray = False
    if settings.embedded_dispatcher:
        from services import migrate, ray_cluster
        from services.dispatcher import Dispatcher

        await asyncio.to_thread(migrate.upgrade, settings.database_url)
        owns_ray = ray_cluster.connect(settings)
        dispatcher = app.state.dispatcher = Dispatcher(settings, app.state.sessions)
        dispatcher_task = asyncio.create_task(dispatcher.run(stop), name="dispatcher")
    try:
        yield
    finally:
        stop.set()
        if dispatcher_task is not None:
            await dispatcher_task
        if owns_ray:
            from services import ray_cluster

            ray_cluster.disconnect()
        engine.dispose()


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="overparam",
        version=package_version(),
        description="Sweeps over over-parameterized networks, trained on Ray, with NTK metrics.",
        lifespan=lifespan,
        openapi_url="/api/v1/openapi.json",
        docs_url="/docs",
    )
    app.state.settings = settings
    # Our own limit, not FastAPI's max_body_size: that one answers 413 in text/plain.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    problems.install(app)
    openapi.install(app)
    v1 = APIRouter(prefix="/api/v1")
    v1.include_router(sweeps.router)
    v1.include_router(runs.router)
    for router in (external_runs, metrics, streams, datasets):
        v1.include_router(router.router)
    v1.include_router(analysis.router)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(dashboard.router)
    dashboard.mount_static(app)
    return app
