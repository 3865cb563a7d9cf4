"""``overparam watch``: one rich progress bar per run of a sweep, fed by the sweep's SSE stream.

Each bar shows the run's step out of its configured steps, its latest loss and λ_min(H(k)),
its state and an ETA from the step rate. The stream asks only for the two metrics shown, so a
wide sweep's other metrics never cross the wire. A run that stops early (loss threshold) fills
its bar when it succeeds; one that diverges or fails keeps its bar and shows its state in red.

The line fits the terminal: when the runs' parameters do not fit beside the bar they are
printed once above the bars (each bar then says only ``run ID``), then the ETA is left out and
the bar narrowed; numbers are never cut.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Column

from .client import OverparamClient, ServerEvent
from .tables import number

# The worker's metric names (worker/metrics.py LOSS and LAMBDA_MIN; a test keeps them equal):
# the client talks HTTP only and does not import the worker.
LOSS = "loss"
LAMBDA_MIN = "ntk_lambda_min"
FINAL = frozenset({"succeeded", "diverged", "failed", "cancelled"})
NUMBER_WIDTH = 9  # number() is at most 9 characters: -1.41e+15
STATE_WIDTH = 9  # succeeded, cancelled
ETA_WIDTH = 11  # "ETA 0:00:21"
BAR_WIDTHS = (28, 16, 8)  # narrowed in this order before anything else goes
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


def overrides_text(run: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in (run.get("overrides") or {}).items())


def run_label(run: dict[str, Any]) -> str:
    overrides = overrides_text(run)
    return f"run {run['id']}" + (f" {overrides}" if overrides else "")


@dataclass(frozen=True)
class Layout:
    """How a bar's line fits ``width`` columns: the description's width, whether it holds the
    run's parameters or only its id, the bar's width and whether the ETA is shown."""

    description: int
    full_labels: bool
    bar: int
    eta: bool

    @classmethod
    def fit(cls, width: int, runs: Sequence[dict[str, Any]]) -> Layout:
        steps = max((int((r.get("config") or {}).get("steps") or 1) for r in runs), default=1)
        counts = 2 * len(str(steps)) + 1
        numbers = len("loss ") + len("λ_min ") + 2 * NUMBER_WIDTH
        full = max((len(run_label(r)) for r in runs), default=0)
        ids = max((len(f"run {r['id']}") for r in runs), default=0)
        tries = [(True, BAR_WIDTHS[0], True)]
        tries += [(False, bar, eta) for eta in (True, False) for bar in BAR_WIDTHS]
        for full_labels, bar, eta in tries:
            fixed = bar + counts + numbers + STATE_WIDTH + (ETA_WIDTH if eta else 0)
            gaps = 6 if eta else 5  # one space between the columns
            room = width - fixed - gaps
            if room >= (full if full_labels else ids):
                return cls(room, full_labels, bar, eta)
        return cls(ids, False, BAR_WIDTHS[-1], False)


class SweepWatch:
    """Progress bars of a sweep's runs, updated from stream events."""

    def __init__(
        self, runs: Iterable[dict[str, Any]], progress: Progress, full_labels: bool = True
    ) -> None:
        self.progress = progress
        self.lines: dict[int, RunLine] = {}
        self.tasks: dict[int, TaskID] = {}
        for run in runs:
            total = int((run.get("config") or {}).get("steps") or 1)
            label = run_label(run) if full_labels else f"run {run['id']}"
            line = RunLine(run["id"], label, total, status=run["status"])
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
            "loss": number(line.loss),
            "lam": number(line.lambda_min),
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


def make_progress(console: Console, layout: Layout | None = None) -> Progress:
    """The bars' columns, sized by ``layout`` (default: a wide terminal's)."""
    layout = layout or Layout(40, True, BAR_WIDTHS[0], True)
    columns: list[str | ProgressColumn] = [
        TextColumn(
            "{task.description}",
            style="bold",
            table_column=Column(width=layout.description, no_wrap=True),
        ),
        BarColumn(bar_width=layout.bar),
        MofNCompleteColumn(),
        TextColumn(f"loss [magenta]{{task.fields[loss]:>{NUMBER_WIDTH}}}[/magenta]"),
        TextColumn(f"λ_min [blue]{{task.fields[lam]:>{NUMBER_WIDTH}}}[/blue]"),
        TextColumn("{task.fields[state]}", table_column=Column(width=STATE_WIDTH)),
    ]
    if layout.eta:
        columns += [TextColumn("ETA"), TimeRemainingColumn()]
    return Progress(*columns, console=console, refresh_per_second=4)


def watch_sweep(client: OverparamClient, sweep_id: int, console: Console) -> dict[str, int]:
    """Show live progress until every run of the sweep is final; returns runs per state."""
    sweep = client.sweep(sweep_id)
    console.print(f"sweep {sweep['id']} ({sweep['name']}): {sweep['run_count']} runs")
    runs = client.runs(sweep_id=sweep_id, fields=["config"])
    layout = Layout.fit(console.width, runs)
    if not layout.full_labels:  # the parameters do not fit beside the bars: list them once
        for run in runs:
            console.print(f"run {run['id']}: {overrides_text(run)}")
    with make_progress(console, layout) as progress:
        watch = SweepWatch(runs, progress, layout.full_labels)
        for event in client.stream_sweep(sweep_id, names=[LOSS, LAMBDA_MIN]):
            if watch.apply(event):
                break
    counts = watch.status_counts()
    console.print(", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return counts
