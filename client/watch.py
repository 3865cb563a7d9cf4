"""``overparam watch``: one rich progress bar per run of a sweep, fed by the sweep's SSE stream.

Each bar shows the run's step out of its configured steps, its latest loss and λ_min(H(k)),
its state and an ETA from the step rate. The stream asks only for the two metrics shown, so a
wide sweep's other metrics never cross the wire. A run that stops early (loss threshold) fills
its bar when it succeeds; one that diverges or fails keeps its bar and shows its state in red.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)

from client.client import OverparamClient, ServerEvent

# The worker's metric names (worker/metrics.py LOSS and LAMBDA_MIN; a test keeps them equal):
# the client talks HTTP only and does not import the worker.
LOSS = "loss"
LAMBDA_MIN = "ntk_lambda_min"
FINAL = frozenset({"succeeded", "diverged", "failed", "cancelled"})
STATUS_STYLE = {
    "queued": "dim",
    "running": "cyan",
    "succeeded": "green",
    "diverged": "red",
    "failed": "red",
    "cancelled": "yellow",
}


def _number(value: Any) -> float:
    if isinstance(value, str):
        return {"NaN": math.nan, "Infinity": math.inf, "-Infinity": -math.inf}.get(value, math.nan)
    return float(value)


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"


@dataclass
class RunLine:
    """What one progress bar shows."""

    run_id: int
    label: str
    total: int
    step: int = 0
    loss: float | None = None
    lambda_min: float | None = None
    status: str = "queued"


def run_label(run: dict[str, Any]) -> str:
    overrides = " ".join(f"{k}={v}" for k, v in (run.get("overrides") or {}).items())
    return f"run {run['id']}" + (f" {overrides}" if overrides else "")


class SweepWatch:
    """Progress bars of a sweep's runs, updated from stream events."""

    def __init__(self, runs: Iterable[dict[str, Any]], progress: Progress) -> None:
        self.progress = progress
        self.lines: dict[int, RunLine] = {}
        self.tasks: dict[int, TaskID] = {}
        for run in runs:
            total = int((run.get("config") or {}).get("steps") or 1)
            line = RunLine(run["id"], run_label(run), total, status=run["status"])
            self.lines[run["id"]] = line
            fields: dict[str, Any] = self._fields(line)  # the columns read them at once
            self.tasks[run["id"]] = progress.add_task(
                line.label, total=total, start=False, **fields
            )
            self._refresh(line)

    @staticmethod
    def _fields(line: RunLine) -> dict[str, str]:
        style = STATUS_STYLE.get(line.status, "")
        return {
            "loss": _fmt(line.loss),
            "lam": _fmt(line.lambda_min),
            "state": f"[{style}]{line.status}[/{style}]" if style else line.status,
        }

    def _refresh(self, line: RunLine) -> None:
        """Redraw one bar from its run's state; a succeeded run that stopped early (its loss
        threshold) is complete at its last step."""
        task = self.tasks[line.run_id]
        if line.status != "queued" and not self.progress.tasks[task].started:
            self.progress.start_task(task)
        total = max(line.step, 1) if line.status == "succeeded" else line.total
        fields: dict[str, Any] = self._fields(line)
        self.progress.update(task, total=total, completed=min(line.step, total), **fields)

    def apply(self, event: ServerEvent) -> bool:
        """Fold one stream event into the bars; True once the sweep's stream has ended."""
        data = event.data if isinstance(event.data, dict) else {}
        line = self.lines.get(data.get("run_id", -1))
        if event.event == "end":
            return "sweep_id" in data or line is None
        if line is None:
            return False
        if event.event == "status":
            line.status = data.get("status") or line.status
        elif event.event == "metrics":
            for point in data.get("points", []):
                step = int(point["step"])
                if point["metric"] == LOSS and step >= line.step:
                    line.step, line.loss = step, _number(point["value"])
                elif point["metric"] == LAMBDA_MIN:
                    line.lambda_min = _number(point["value"])
        self._refresh(line)
        return False

    def status_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for line in self.lines.values():
            counts[line.status] = counts.get(line.status, 0) + 1
        return counts


def make_progress(console: Console) -> Progress:
    return Progress(
        TextColumn("{task.description}", style="bold"),
        BarColumn(bar_width=28),
        MofNCompleteColumn(),
        TextColumn("loss [magenta]{task.fields[loss]:>10}[/magenta]"),
        TextColumn("λ_min [blue]{task.fields[lam]:>10}[/blue]"),
        TextColumn("{task.fields[state]}"),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
        refresh_per_second=4,
    )


def watch_sweep(client: OverparamClient, sweep_id: int, console: Console) -> dict[str, int]:
    """Show live progress until every run of the sweep is final; returns runs per state."""
    sweep = client.sweep(sweep_id)
    console.print(f"sweep {sweep['id']} ({sweep['name']}): {sweep['run_count']} runs")
    runs = client.runs(sweep_id=sweep_id, fields=["config"])
    with make_progress(console) as progress:
        watch = SweepWatch(runs, progress)
        for event in client.stream_sweep(sweep_id, names=[LOSS, LAMBDA_MIN]):
            if watch.apply(event):
                break
    counts = watch.status_counts()
    console.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return counts
