"""The FastAPI app factory. In the embedded default the lifespan also migrates the database,
connects Ray and runs the dispatcher (one process: ``overparam serve``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from anyio import CapacityLimiter, to_thread
from fastapi import APIRouter, Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from api import openapi, problems
from api.auth import Limiter, current_user
from api.limits import BodySizeLimit
from api.observe import ObserveRequests
from api.routes import (
    analysis,
    dashboard,
    datasets,
    external_runs,
    health,
    metrics,
    monitoring,
    runs,
    streams,
    sweeps,
    users,
)
from services.db import make_engine, make_sessionmaker, session_scope
from services.dialects import dialect_for_url
from services.external_runs import MetricBatchIn
from services.manifest import package_version
from services.settings import Settings, get_settings
from services.streams import Hub
from services.telemetry import instrument_pool
from services.users import Caller, admins, local_user

log = logging.getLogger(__name__)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    engine = make_engine(
        settings.database_url,
        pool_size=settings.db_pool_size,
        max_overflow=settings.db_max_overflow,
    )
    instrument_pool(engine)
    app.state.sessions = make_sessionmaker(engine)
    # Threads: request threads (anyio's default limiter) and commit threads apart (api/deps.py);
    # the pool has a connection for each of them and for streams and the dispatcher.
    to_thread.current_default_thread_limiter().total_tokens = settings.api_threads
    app.state.commits = CapacityLimiter(settings.commit_threads)
    app.state.hub = Hub(app.state.sessions, settings.stream_poll_s)
    app.state.dispatcher = None
    stop = asyncio.Event()
    dispatcher_task = None
    owns_ray = False
    held = contextlib.ExitStack()
    if settings.embedded_dispatcher:
        from services import migrate, ray_cluster
        from services.dispatcher import Dispatcher

        # One embedded service per SQLite file: a second one would dispatch the same runs.
        held.enter_context(
            dialect_for_url(settings.database_url).service_lock(settings.database_url)
        )
        await asyncio.to_thread(migrate.upgrade, settings.database_url)
    app.state.local_user = await asyncio.to_thread(_who_is_served, app)
    if settings.embedded_dispatcher:
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

            ray_cluster.disconnect(settings)
        engine.dispose()
        held.close()


def _who_is_served(app: FastAPI) -> Caller:
    """The built-in local user; with authentication required, refuses to start without an
    admin (nobody could make the first user)."""
    with session_scope(app.state.sessions) as db:
        local = Caller.of(local_user(db_session=db))
        if app.state.auth == "required" and not admins(db_session=db):
            raise RuntimeError(
                "authentication is required (OVERPARAM_AUTH) but there is no admin yet: make "
                "one with `overparam admin create-user NAME --admin` (it prints a token)"
            )
    return local


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
    app.state.auth = "off" if settings.auth == "off" else "required"
    app.state.limiter = Limiter(settings.rate_limit)
    if settings.cors_origins:  # closed unless configured
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "PATCH", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key", "Last-Event-ID"],
        )
    # Our own limit, not FastAPI's max_body_size: that one answers 413 in text/plain.
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(ObserveRequests)  # added last: the outermost, it sees every answer
    problems.install(app)
    openapi.install(app, MetricBatchIn)  # validated by its route from the raw bytes
    v1 = APIRouter(prefix="/api/v1", dependencies=[Depends(current_user)])
    v1.include_router(sweeps.router)
    v1.include_router(runs.router)
    for router in (external_runs, metrics, streams, datasets):
        v1.include_router(router.router)
    v1.include_router(analysis.router)
    v1.include_router(users.router)
    app.include_router(v1)
    app.include_router(health.router)
    app.include_router(monitoring.router)
    app.include_router(dashboard.router)
    dashboard.mount_static(app)
    return app
