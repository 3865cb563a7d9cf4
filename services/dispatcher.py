"""The dispatcher: the one Ray driver and the one writer of metrics.

It claims queued runs up to the cluster's capacity, submits one streaming Ray task per run,
consumes every stream concurrently (``async for`` / ``await ref``, never ``ray.get`` in async
code), writes each metric batch idempotently together with the run's summary and heartbeat,
and sets the final state. Each run is consumed in its own asyncio task with its own error
handling, so one failing run never affects another run or the dispatcher itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from sqlalchemy import func, select, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from services.analysis import analyze_run, load_points
from services.datasets import load_arrays
from services.db import session_scope
from services.leadership import Leadership
from services.metrics import metric_ids, write_series
from services.models import DispatcherRecord, MetricChunk, Run, User, utcnow
from services.numbers import json_number
from services.resources import ResourceRequest, ResourceSpec, resolve, why_it_cannot_fit
from services.runs import (
    block_run,
    cancel_requested_ids,
    claim_runs,
    queued_runs,
    running_by_owner,
    transition,
    unblock_runs,
)
from services.settings import Settings
from services.users import Caller, quota
from worker.config import RunConfig
from worker.events import Event, MetricBatch, RunFinished, RunStarted
from worker.metric_names import LAMBDA_MIN, LOSS

log = logging.getLogger(__name__)

HEARTBEAT_PERIOD_S = 2.0
MAX_BACKOFF_S = 10.0
T = TypeVar("T")


@dataclass
class RunProgress:
    """What the dispatcher knows of a running run; becomes the run's ``summary``."""

    steps_done: int = 0
    initial_loss: float | None = None
    final_loss: float | None = None
    lambda_min_initial: float | None = None
    lambda_min_min: float | None = None
    wall_time_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_summary(cls, summary: dict[str, Any]) -> RunProgress:
        """Continue from a stored summary (a resumed run does not re-send its early steps)."""

        def number(key: str) -> float | None:
            value = summary.get(key)
            return None if value is None else float(value)

        return cls(
            steps_done=int(summary.get("steps_done", 0)),
            initial_loss=number("initial_loss"),
            final_loss=number("final_loss"),
            lambda_min_initial=number("lambda_min_initial"),
            lambda_min_min=number("lambda_min_min"),
        )

    def observe(self, series: dict[str, tuple[list[int], list[float]]]) -> None:
        """Fold a batch's loss and λ_min(H) points into the progress."""
        for step, value in zip(*series.get(LOSS, ([], [])), strict=True):
            if step == 0:
                self.initial_loss = value
            if step >= self.steps_done:
                self.steps_done, self.final_loss = step, value
        for step, value in zip(*series.get(LAMBDA_MIN, ([], [])), strict=True):
            if step == 0:
                self.lambda_min_initial = value
            if not math.isnan(value) and (
                self.lambda_min_min is None or value < self.lambda_min_min
            ):
                self.lambda_min_min = value

    def as_summary(self) -> dict[str, Any]:
        numbers = {
            "steps_done": self.steps_done,
            "initial_loss": json_number(self.initial_loss),
            "final_loss": json_number(self.final_loss),
            "lambda_min_initial": json_number(self.lambda_min_initial),
            "lambda_min_min": json_number(self.lambda_min_min),
            "wall_time_s": self.wall_time_s,
        }
        return numbers | self.extra


@dataclass(frozen=True)
class DispatcherIdentity:
    """Which process this dispatcher is, for its heartbeat row."""

    id: str
    host: str
    pid: int

    @classmethod
    def of_this_process(cls) -> DispatcherIdentity:
        host, pid = socket.gethostname(), os.getpid()
        return cls(id=f"{host}:{pid}:{uuid.uuid4().hex[:8]}", host=host, pid=pid)


@dataclass(frozen=True)
class Launch:
    """Everything one attempt of a run is submitted with (prepared off the event loop)."""

    run: Run
    checkpoint_dir: str
    # The first step the service has not stored: the attempt may resume from a checkpoint at
    # or before it, never after (the newest checkpoint can be ahead of the stored points).
    resume_at_most: int
    arrays: tuple[Any, Any] | None  # (X, y) of an uploaded dataset


def is_system_failure(exc: BaseException) -> bool:
    """A lost worker, node or object (retry it) rather than an exception raised by the run."""
    from ray.exceptions import RayError, RayTaskError, TaskCancelledError

    if isinstance(exc, RayTaskError):
        return is_system_failure(exc.cause) if isinstance(exc.cause, RayError) else False
    return isinstance(exc, RayError) and not isinstance(exc, TaskCancelledError)


def describe_exception(exc: BaseException) -> str:
    """'Type: message' of the user-level cause, without Ray's traceback decoration."""
    cause = getattr(exc, "cause", None) or exc
    message = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {message[-1] if message else ''}".strip()


def fits(request: ResourceRequest, free: dict[str, float]) -> bool:
    return (
        request.cpus <= free["CPU"]
        and request.gpus <= free["GPU"]
        and request.memory_bytes <= free["memory"]
    )


class FairShare:
    """The order in which owners' queued runs get slots: by running runs per share, then
    priority and age; and each owner's cap on running runs (``max_running_runs``)."""

    def __init__(self, db: Session, settings: Settings) -> None:
        self.running = running_by_owner(db_session=db)
        users = list(db.scalars(select(User)))
        self.share: dict[int | None, float] = {u.id: max(u.share, 1e-9) for u in users}
        self.cap: dict[int | None, float] = {
            u.id: quota(Caller.of(u), "max_running_runs", settings) for u in users
        }

    def order(self, candidates: list[Run]) -> list[Run]:
        """Round robin by load: the owner with the fewest running runs for their share next."""
        queues: dict[int | None, list[Run]] = {}
        for run in candidates:  # each owner's queue is by priority, then age, already
            queues.setdefault(run.owner_id, []).append(run)
        load = {owner: self.running.get(owner, 0) for owner in queues}
        out: list[Run] = []
        while queues:
            owner = min(queues, key=lambda o: (load[o] / self.share.get(o, 1.0), o or 0))
            out.append(queues[owner].pop(0))
            load[owner] += 1
            if not queues[owner]:
                del queues[owner]
        return out

    def may_start(self, run: Run) -> bool:
        return self.running.get(run.owner_id, 0) < self.cap.get(run.owner_id, float("inf"))

    def started(self, run: Run) -> None:
        self.running[run.owner_id] = self.running.get(run.owner_id, 0) + 1


class Dispatcher:
    def __init__(
        self,
        settings: Settings,
        session_factory: sessionmaker[Session],
        *,
        submit: Callable[[Launch], Any] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = session_factory
        self.leadership = Leadership(session_factory.kw["bind"])
        self._submit = submit or self._submit_to_ray
        self.active: dict[int, Any] = {}  # run id -> Ray ObjectRefGenerator
        self.requests: dict[int, ResourceRequest] = {}  # run id -> what it holds
        self.identity = DispatcherIdentity.of_this_process()
        self.leading = False
        self._last_beat = -math.inf
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake: asyncio.Event | None = None  # set when a slot frees or runs are queued
        self._nodes: list[dict[str, float]] | None = None  # as the last claim saw them

    # -- Ray -------------------------------------------------------------------------------

    def checkpoint_dir(self, run: Run) -> str:
        """Where ``run`` checkpoints, on storage every node sees (a volume in compose). The
        creation time makes it unique across databases that share the storage."""
        name = f"run-{run.id}-{run.created_at:%Y%m%dT%H%M%S%f}"
        return str((self.settings.checkpoint_dir / name).resolve())

    def _submit_to_ray(self, launch: Launch) -> Any:
        from worker.task import run_training

        request = self.request_of(launch.run)
        # max_retries=0: Ray would replay a retried generator from its start and drop the
        # first items as duplicates, but a resumed run yields from its checkpoint instead. The
        # dispatcher retries explicitly (re-queue, bounded by max_attempts).
        return run_training.options(
            num_cpus=request.cpus,
            num_gpus=request.gpus,
            memory=request.memory_bytes,
            max_retries=0,
        ).remote(
            launch.run.config,
            checkpoint_dir=launch.checkpoint_dir,
            resume_at_most=launch.resume_at_most,
            arrays=launch.arrays,
        )

    def _prepare(self, run: Run) -> Launch:
        """Read what the attempt needs: how far it may resume, and an uploaded dataset."""
        with session_scope(self.sessions) as db:
            loss_id = metric_ids(db_session=db, names=[LOSS])[LOSS]
            # Batches are written in step order and re-sent points are ignored, so the stored
            # loss steps are always 0..k: their count is the first step not stored.
            stored = db.scalar(
                select(func.sum(MetricChunk.count)).where(
                    MetricChunk.run_id == run.id, MetricChunk.metric_id == loss_id
                )
            )
            data = run.config.get("data", {})
            arrays = None
            if data.get("kind") == "dataset":
                arrays = load_arrays(db_session=db, dataset_id=int(data["dataset_id"]))
        return Launch(run, self.checkpoint_dir(run), int(stored or 0), arrays)

    def request_of(self, run: Run) -> ResourceRequest:
        if run.resources:
            return ResourceRequest.from_dict(run.resources)
        return resolve(ResourceSpec(), RunConfig.model_validate(run.config), self.settings)

    def cluster(self) -> tuple[dict[str, float], list[dict[str, float]]]:
        """Ray's cluster totals and the totals of each alive node (CPU, GPU, memory bytes)."""
        import ray

        keys = ("CPU", "GPU", "memory")
        totals = {k: float(ray.cluster_resources().get(k, 0.0)) for k in keys}
        nodes = [
            {k: float(node["Resources"].get(k, 0.0)) for k in keys}
            for node in ray.nodes()
            if node.get("Alive") and node["Resources"].get("CPU", 0.0) > 0
        ]
        return totals, nodes

    def free_resources(self, totals: dict[str, float]) -> dict[str, float]:
        free = dict(totals)
        for request in self.requests.values():
            free["CPU"] -= request.cpus
            free["GPU"] -= request.gpus
            free["memory"] -= request.memory_bytes
        return free

    # -- database (called in threads) ------------------------------------------------------

    def _claim(
        self, free: dict[str, float], slots: int, nodes: list[dict[str, float]]
    ) -> list[Run]:
        """Claim queued runs that fit in ``free``, sharing the slots fairly between owners.

        Each turn goes to the owner with the fewest running runs for their share (then their
        highest priority, oldest run), so a big sweep never starves a colleague's small one;
        runs that do not fit what is free are passed over (smaller ones backfill). A run that
        fits on no node of the cluster is marked blocked, with the reason, and no longer
        considered; when the nodes change every blocked run is considered again.
        """
        with session_scope(self.sessions) as db:
            if nodes != self._nodes:
                unblock_runs(db_session=db)
                self._nodes = nodes
            fair = FairShare(db, self.settings)
            chosen: list[int] = []
            for run in fair.order(queued_runs(db_session=db, limit=64)):
                request = self.request_of(run)
                reason = why_it_cannot_fit(request, nodes)
                if reason is not None:
                    block_run(db_session=db, run_id=run.id, reason=reason)
                elif len(chosen) < slots and fair.may_start(run) and fits(request, free):
                    chosen.append(run.id)
                    fair.started(run)
                    free = {
                        "CPU": free["CPU"] - request.cpus,
                        "GPU": free["GPU"] - request.gpus,
                        "memory": free["memory"] - request.memory_bytes,
                    }
            return claim_runs(db_session=db, run_ids=chosen)

    def _record(self, run_id: int, event: Event, progress: RunProgress) -> None:
        with session_scope(self.sessions) as db:
            run = db.get(Run, run_id)
            if run is None:  # deleted while running; nothing to record
                return
            if isinstance(event, RunStarted):
                run.manifest = run.manifest | {
                    "data_checksum": event.data_checksum,
                    "parameter_count": event.parameter_count,
                    "device": event.device,
                    "torch_version": event.torch_version,
                }
            elif isinstance(event, MetricBatch):
                run.points += write_series(db_session=db, run_id=run_id, series=event.series)
                progress.observe(event.series)
            elif isinstance(event, RunFinished):
                progress.wall_time_s = event.wall_time_s
                progress.extra["stop_reason"] = event.reason
            run.summary = progress.as_summary()
            run.heartbeat_at = utcnow()

    def _finish(self, run_id: int, status: str, error: str | None) -> None:
        with session_scope(self.sessions) as db:
            if status == "queued":  # a retry: back in the queue, the error kept for the record
                transition(
                    db_session=db, run_id=run_id, expected="running", new="queued", error=error
                )
                return
            fields: dict[str, Any] = {"error": error}
            run = db.get(Run, run_id)
            if run is not None and status in ("succeeded", "diverged"):
                fields["summary"] = run.summary | {"analysis": self._analysis(db, run)}
            transition(db_session=db, run_id=run_id, expected="running", new=status, **fields)

    @staticmethod
    def _analysis(db: Session, run: Run) -> dict[str, Any] | None:
        """The run's analysis (fitted rate vs theory, ...), stored with its final state."""
        try:
            return analyze_run(load_points(db_session=db, run_id=run.id), run.config)
        except Exception:  # the analysis is recomputable on demand; never lose the run's end
            log.exception("analysis of run %s failed", run.id)
            return None

    def _beat(self, nodes: list[dict[str, float]]) -> None:
        """This dispatcher's heartbeat row (at most every few seconds), with the cluster's nodes
        so the API can refuse runs that fit on no worker."""
        now = time.monotonic()
        if now - self._last_beat < HEARTBEAT_PERIOD_S:
            return
        self._last_beat = now
        with session_scope(self.sessions) as db:
            record = db.get(DispatcherRecord, self.identity.id)
            if record is None:
                record = DispatcherRecord(
                    id=self.identity.id, host=self.identity.host, pid=self.identity.pid
                )
                db.add(record)
            record.heartbeat_at = utcnow()
            record.leader = self.leading
            record.nodes = nodes

    def _heartbeat(self, run_ids: list[int]) -> None:
        with session_scope(self.sessions) as db:
            db.execute(update(Run).where(Run.id.in_(run_ids)).values(heartbeat_at=utcnow()))

    def _requeue(self, run_ids: list[int]) -> None:
        with session_scope(self.sessions) as db:
            for run_id in run_ids:
                transition(
                    db_session=db,
                    run_id=run_id,
                    expected="running",
                    new="queued",
                    cancel_requested=False,
                )

    def _cancel_flags(self, run_ids: list[int]) -> set[int]:
        with session_scope(self.sessions) as db:
            return cancel_requested_ids(db_session=db, run_ids=run_ids)

    def requeue_orphans(self) -> int:
        """Put back runs left ``running`` by a dispatcher that is gone; returns how many."""
        with session_scope(self.sessions) as db:
            query = select(Run.id).where(Run.status == "running", Run.external.is_(False))
            ids = list(db.scalars(query))
        self._requeue(ids)
        return len(ids)

    # -- the loop --------------------------------------------------------------------------

    async def tick(self) -> None:
        """One pass: heartbeats and cancellations, then claim and submit runs up to capacity."""
        if self.active:
            await asyncio.to_thread(self._heartbeat, list(self.active))
            for run_id in await asyncio.to_thread(self._cancel_flags, list(self.active)):
                self._cancel(run_id)
        totals, nodes = await asyncio.to_thread(self.cluster)
        await asyncio.to_thread(self._beat, nodes)
        slots = (self.settings.max_concurrent_runs or 1 << 30) - len(self.active)
        if slots <= 0:
            return
        free = self.free_resources(totals)
        for run in await asyncio.to_thread(self._claim, free, slots, nodes):
            self.requests[run.id] = self.request_of(run)
            try:
                gen = self._submit(await asyncio.to_thread(self._prepare, run))
            except Exception as exc:  # e.g. an unpicklable config: this run's failure only
                await asyncio.to_thread(self._finish, run.id, "failed", describe_exception(exc))
                continue
            self.active[run.id] = gen
            progress = RunProgress.from_summary(run.summary)
            consume = self._consume(run.id, run.attempt, gen, progress)
            task = asyncio.create_task(consume, name=f"run-{run.id}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _cancel(self, run_id: int) -> None:
        import ray

        gen = self.active.get(run_id)
        if gen is not None:
            ray.cancel(gen)

    async def _consume(self, run_id: int, attempt: int, gen: Any, progress: RunProgress) -> None:
        status: str = "failed"
        error: str | None = "the worker stopped without reporting a result"
        try:
            async for ref in gen:
                event = await ref
                await self._retrying(self._record, run_id, event, progress)
                if isinstance(event, RunFinished):
                    status, error = event.status, None
                    if event.status == "diverged":
                        error = event.reason
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure of this run is this run's alone
            status, error = self._classify(exc, progress, attempt, self.settings.max_attempts)
        finally:
            self.active.pop(run_id, None)
            self.requests.pop(run_id, None)
            self.wake()  # a slot is free
        try:
            await self._retrying(self._finish, run_id, status, error)
        except Exception:
            log.exception("could not record the end of run %s", run_id)

    @staticmethod
    def _classify(
        exc: Exception, progress: RunProgress, attempt: int, max_attempts: int
    ) -> tuple[str, str]:
        """The run's next state after ``exc``: cancelled, re-queued (a lost worker) or failed."""
        from ray.exceptions import TaskCancelledError

        if isinstance(exc, TaskCancelledError):
            return "cancelled", f"cancelled at step {progress.steps_done}"
        where = f"(attempt {attempt}, last step {progress.steps_done})"
        if is_system_failure(exc) and attempt < max_attempts:
            log.warning("run lost its worker %s; re-queued to resume: %s", where, exc)
            return "queued", f"attempt {attempt} lost its worker: {describe_exception(exc)}"
        return "failed", f"{describe_exception(exc)} {where}"

    def wake(self) -> None:
        """Tick now: a run ended or runs were queued (call from the dispatcher's event loop)."""
        if self._wake is not None:
            self._wake.set()

    async def _sleep(self, stop: asyncio.Event) -> None:
        """Until the next tick: a wake-up, ``stop``, or the poll period (runs queued by another
        process)."""
        assert self._wake is not None
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.settings.poll_interval_s, return_when="FIRST_COMPLETED"
            )
        finally:
            for wait in waits:
                wait.cancel()
        self._wake.clear()

    async def run(self, stop: asyncio.Event) -> None:
        """Dispatch until ``stop`` is set, leading whenever this process can.

        Supervised: a term of leadership ends when the lock is lost (say, PostgreSQL restarted)
        or an error escapes it; its runs are stopped and re-queued, and after a backoff the
        dispatcher waits to lead again. It never dies of a database that went away.
        """
        self._wake = asyncio.Event()
        delay = 0.0
        while not stop.is_set():
            try:
                await self._term(stop)
                delay = 0.0
            except Exception:
                delay = min(max(2 * delay, 0.5), MAX_BACKOFF_S)
                log.exception("dispatcher failed; trying again in %.1f s", delay)
            if delay and not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)

    async def _term(self, stop: asyncio.Event) -> None:
        """Wait to lead, then dispatch until ``stop`` or the lock is lost; then stop the runs and
        re-queue them."""
        waiting_logged = False
        while not stop.is_set() and not await asyncio.to_thread(self.leadership.try_acquire):
            if not waiting_logged:
                log.info("standby: another dispatcher leads; waiting for its lock")
                waiting_logged = True
            await asyncio.to_thread(self._beat, [])
            await self._sleep(stop)
        if stop.is_set():
            return
        self.leading = True
        self._last_beat = -math.inf
        log.info("leading: this process dispatches")
        try:
            requeued = await self._retrying(self.requeue_orphans)
            if requeued:
                log.info("re-queued %d runs left running by a previous dispatcher", requeued)
            failures = 0
            while not stop.is_set():
                if not await asyncio.to_thread(self.leadership.still_held):
                    log.error("lost the dispatcher lock: stopping the runs, then waiting to lead")
                    return
                try:
                    await self.tick()
                    failures = 0
                except Exception:
                    failures += 1
                    log.exception("dispatcher tick failed (%d in a row); retrying", failures)
                    await asyncio.sleep(min(0.5 * failures, MAX_BACKOFF_S))
                await self._sleep(stop)
        finally:
            self.leading = False
            await self.shutdown()
            with contextlib.suppress(Exception):  # gone with the connection anyway
                await asyncio.to_thread(self.leadership.release)

    async def _retrying(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a thread, tried again after a backoff while the database is
        unreachable (the error is transient: an operational or interface error)."""
        delay = 0.1
        while True:
            try:
                return await asyncio.to_thread(fn, *args)
            except (OperationalError, InterfaceError) as exc:
                log.warning("database unreachable (%s); retrying in %.1f s", exc.orig, delay)
                await asyncio.sleep(delay)
                delay = min(2 * delay, MAX_BACKOFF_S)

    async def shutdown(self) -> None:
        """Stop this dispatcher's runs and re-queue them (if the database answers; else the next
        leader re-queues them as orphans)."""
        run_ids = list(self.active)
        for run_id in run_ids:
            with contextlib.suppress(Exception):  # a dead Ray or a finished task: nothing to stop
                self._cancel(run_id)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.active.clear()
        self.requests.clear()
        try:
            await asyncio.to_thread(self._requeue, run_ids)
        except Exception:
            log.exception("could not re-queue %d runs; the next leader will", len(run_ids))
