"""Response schemas (``XPublic``, ``XsPublic``); request schemas live with their services."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

RunStatus = Literal["queued", "running", "succeeded", "diverged", "failed", "cancelled"]


class Public(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class SweepPublic(Public):
    id: int
    owner: str | None = None
    priority: int = 0
    name: str
    kind: Literal["grid", "experiment"] = "grid"  # an experiment: a group of external runs
    spec: dict[str, Any]
    run_count: int
    created_at: datetime
    status_counts: dict[str, int] = {}


class SweepCreated(Public):
    id: int
    name: str
    run_count: int
    run_ids: list[int]


class PlannedRunPublic(BaseModel):
    index: int
    overrides: dict[str, Any]
    config: dict[str, Any]
    resources: dict[str, Any]


class SweepPlan(BaseModel):
    """What ``POST /sweeps?dry_run=true`` answers: the runs the spec expands to, not stored."""

    name: str
    run_count: int
    runs: list[PlannedRunPublic]


class SweepsPublic(BaseModel):
    data: list[SweepPublic]
    count: int


class RunListed(Public):
    """A run in a list: everything but its config and manifest (``?fields=`` adds them)."""

    id: int
    owner: str | None = None
    sweep_id: int | None  # an external run's: its experiment's
    external: bool
    name: str | None = None
    tags: dict[str, str] = {}
    index: int
    status: RunStatus
    attempt: int
    error: str | None
    blocked_reason: str | None = None  # queued, but fits on no node of the cluster
    overrides: dict[str, Any]
    summary: dict[str, Any]
    cancel_requested: bool
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    config: dict[str, Any] | None = None
    manifest: dict[str, Any] | None = None


class RunPublic(RunListed):
    config: dict[str, Any]
    manifest: dict[str, Any]


class RunsPublic(BaseModel):
    data: list[RunListed]
    count: int


class MetricPoint(BaseModel):
    metric: str
    step: int
    value: float | Literal["NaN", "Infinity", "-Infinity"]


class MetricsPage(BaseModel):
    data: list[MetricPoint]
    count: int
    next_cursor: str | None


class MetricNames(BaseModel):
    data: list[str]
    count: int
