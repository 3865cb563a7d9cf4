"""Events a run emits, in order: one ``RunStarted``, ``MetricBatch``es, one ``RunFinished``.

They are what a Ray streaming task yields and what the dispatcher consumes; plain picklable
dataclasses so the worker stays independent of Ray and of the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

FinalStatus = Literal["succeeded", "diverged", "cancelled"]


@dataclass(frozen=True)
class RunStarted:
    """Facts fixed at the start: for the run's reproducibility manifest.

    Sent again by every attempt; ``resumed_from_step`` > 0 when the attempt continues from a
    checkpoint (its points start at that step).
    """

    data_checksum: str  # sha256 of the source X then y, float64 (before normalization/noise)
    parameter_count: int
    device: str
    torch_version: str
    resumed_from_step: int = 0


@dataclass(frozen=True)
class MetricBatch:
    """Metric points ``(name, step, value)``; values may be NaN or ±inf."""

    points: list[tuple[str, int, float]] = field(default_factory=list)


@dataclass(frozen=True)
class RunFinished:
    """The end of a run; ``wall_time_s`` is summed over the attempts that resumed it."""

    status: FinalStatus
    steps_done: int
    reason: str
    wall_time_s: float


Event = RunStarted | MetricBatch | RunFinished
