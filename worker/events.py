"""Events a run emits, in order: one ``RunStarted``, ``MetricBatch``es, one ``RunFinished``.

They are what a Ray streaming task yields and what the dispatcher consumes; plain picklable
dataclasses so the worker stays independent of Ray and of the database.
"""

from __future__ import annotations

from collections.abc import Iterable
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
    """Metric points as columns: {name: (steps, values)}, the shape the store keeps them in
    (grouped here, in the worker, not by the dispatcher); values may be NaN or ±inf."""

    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    @classmethod
    def of(cls, points: Iterable[tuple[str, int, float]]) -> MetricBatch:
        series: dict[str, tuple[list[int], list[float]]] = {}
        for name, step, value in points:
            steps, values = series.setdefault(name, ([], []))
            steps.append(step)
            values.append(value)
        return cls(series)

    @property
    def points(self) -> list[tuple[str, int, float]]:
        """The points as (name, step, value)."""
        return [
            (name, step, value)
            for name, (steps, values) in self.series.items()
            for step, value in zip(steps, values, strict=True)
        ]


@dataclass(frozen=True)
class RunFinished:
    """The end of a run; ``wall_time_s`` is summed over the attempts that resumed it."""

    status: FinalStatus
    steps_done: int
    reason: str
    wall_time_s: float


Event = RunStarted | MetricBatch | RunFinished
