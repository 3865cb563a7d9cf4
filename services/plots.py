"""PNG plots of runs and sweeps (matplotlib, Agg backend, object API: thread-safe per figure).

Kinds: ``loss`` (loss curves on a log axis coloured by a swept parameter, the theory's
linearized prediction dashed), ``lambda_min`` (λ_min(G⁽ᴴ⁾(k)) / λ₀ over training, Du's
last-hidden-layer Gram, which is the NTK of a two-layer net, with the λ₀/2 line the theorems
keep it above), ``scaling`` (the sweep's scaling-law fits on log–log axes,
fitted line and slope with its interval in the legend) and ``movement`` (relative weight
movement ‖W⁽ʰ⁾(k) − W⁽ʰ⁾(0)‖_F / ‖W⁽ʰ⁾(0)‖_F of each layer over training). The renderers take
plain data; :func:`sweep_plot` and :func:`run_plot` gather it from the database.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from sqlalchemy import select
from sqlalchemy.orm import Session

from services import history
from services.analysis import layer_names
from services.errors import NotFound
from services.models import Run
from services.runs import get_run, get_sweep
from services.sweep_analysis import (
    SEED_KEYS,
    RunRecord,
    analyze_sweep,
    sweep_records,
    swept_parameters,
)
from worker.metric_names import GRAM_H_MIN, LAMBDA0, LAMBDA_MIN, LAYER_METRICS, LOSS, PREDICTED_LOSS

SWEEP_KINDS: tuple[str, ...] = ("loss", "lambda_min", "scaling", "movement")
RUN_KINDS: tuple[str, ...] = ("loss", "lambda_min", "movement")
PLOT_POINTS = 600  # points per series (downsampled: min and max per bucket survive)
DPI = 100
MAX_SCALING_PANELS = 6
_SCALING_ORDER = ("neuron_dist_max", "weight_dist_rel", "pattern_flips", "ntk_rel_change")


class NothingToPlot(NotFound):
    """The runs have none of the metrics the plot shows (yet): a 404 over the API."""


@dataclass(frozen=True)
class Curve:
    """One run's series of one quantity; ``value`` is its colour parameter's value."""

    run_id: int
    value: Any
    steps: Sequence[float]
    values: Sequence[float]
    predicted: tuple[Sequence[float], Sequence[float]] | None = None


@dataclass
class Palette:
    """Colours for the values of one parameter: a log scale for positive numbers."""

    name: str | None
    values: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        distinct = {repr(v): v for v in self.values}
        numeric = all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in distinct.values()
        )
        self.ordered = sorted(distinct.values()) if numeric else list(distinct.values())
        self.numeric = numeric and bool(distinct)
        if self.numeric and min(self.ordered) > 0 and max(self.ordered) > min(self.ordered):
            self.norm: Normalize | None = LogNorm(min(self.ordered), max(self.ordered))
        elif self.numeric and max(self.ordered) > min(self.ordered):
            self.norm = Normalize(min(self.ordered), max(self.ordered))
        else:
            self.norm = None

    def color(self, value: Any) -> Any:
        if self.norm is not None:
            return colormaps["viridis"](0.9 * float(self.norm(value)))
        index = [repr(v) for v in self.ordered].index(repr(value)) if self.ordered else 0
        return colormaps["tab10"](index % 10)

    def label(self, value: Any) -> str:
        return f"{self.name} = {value}" if self.name else str(value)

    def handles(self) -> list[Line2D]:
        return [Line2D([], [], color=self.color(v), label=self.label(v)) for v in self.ordered]


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no global backend state."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Figure) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _positive(steps: Sequence[float], values: Sequence[float]) -> tuple[list[float], list[float]]:
    pairs = [
        (s, v)
        for s, v in zip(steps, values, strict=True)
        if v is not None and math.isfinite(v) and v > 0
    ]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _curves_figure(
    curves: Sequence[Curve],
    palette: Palette,
    title: str,
    ylabel: str,
    *,
    reference: float | None = None,
    reference_label: str = "",
    log_y: bool = True,
) -> bytes:
    if not curves:
        raise NothingToPlot(f"nothing to plot for {title}")
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    has_prediction = False
    for curve in curves:
        xs, ys = _positive(curve.steps, curve.values)
        ax.plot(xs, ys, color=palette.color(curve.value), lw=1.2, alpha=0.85)
        if curve.predicted is not None:
            px, py = _positive(*curve.predicted)
            ax.plot(px, py, color=palette.color(curve.value), lw=1.0, ls="--", alpha=0.9)
            has_prediction = True
    handles = palette.handles()
    if has_prediction:
        handles.append(Line2D([], [], color="grey", ls="--", label="theory (linearized, H^∞)"))
    if reference is not None:
        ax.axhline(reference, color="black", ls=":", lw=1)
        handles.append(Line2D([], [], color="black", ls=":", label=reference_label))
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel("step k")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="best")
    return _png(fig)


def loss_plot(curves: Sequence[Curve], palette: Palette, title: str) -> bytes:
    """Loss curves on a log axis, the linearized theory dashed in the same colour."""
    return _curves_figure(curves, palette, title, "training loss L(k)")


def lambda_min_plot(curves: Sequence[Curve], palette: Palette, title: str) -> bytes:
    """λ_min(G⁽ᴴ⁾(k)) / λ₀ (curves already divided; G⁽ᴴ⁾ = H for two_layer) with the λ₀/2
    line the theorems keep it above."""
    return _curves_figure(
        curves,
        palette,
        title,
        "λ_min(G⁽ᴴ⁾(k)) / λ₀",
        reference=0.5,
        reference_label="λ₀/2 (Du et al.)",
        log_y=False,
    )


def movement_plot(
    curves_by_layer: Mapping[str, Sequence[Curve]], palette: Palette, title: str
) -> bytes:
    """Relative weight movement of each layer over training, one panel per layer."""
    layers = [layer for layer, curves in curves_by_layer.items() if curves]
    if not layers:
        raise NothingToPlot("no weight-distance metrics to plot")
    cols = min(3, len(layers))
    rows = math.ceil(len(layers) / cols)
    fig = _figure(7, 4.5) if len(layers) == 1 else _figure(4.2 * cols, 3.4 * rows)
    for i, layer in enumerate(layers):
        ax = fig.add_subplot(rows, cols, i + 1)
        for curve in curves_by_layer[layer]:
            xs, ys = _positive(curve.steps, curve.values)
            ax.plot(xs, ys, color=palette.color(curve.value), lw=1.1, alpha=0.85)
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("step k")
        ax.grid(True, alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel("‖W(k) − W(0)‖_F / ‖W(0)‖_F")
    fig.axes[0].legend(handles=palette.handles(), fontsize=7)
    fig.suptitle(title)
    return _png(fig)


def _scaling_panels(fits: Sequence[Mapping[str, Any]], x: str) -> list[str]:
    """The quantities to show, laziness first; a panel identical to one before it (G⁽ᴴ⁾ is
    the NTK of a two-layer net) is left out."""
    signature: dict[str, str] = {}
    for f in fits:
        if f["x"] == x and f["kind"] == "power":
            signature[f["y"]] = signature.get(f["y"], "") + f"{f['slope']!r},{f['intercept']!r};"

    def order(name: str) -> tuple[int, str]:
        base = name.split("/")[0]
        return (_SCALING_ORDER.index(base) if base in _SCALING_ORDER else 99, name)

    panels: list[str] = []
    for y in sorted(signature, key=order):
        if signature[y] not in {signature[p] for p in panels}:
            panels.append(y)
    return panels[:MAX_SCALING_PANELS]


def _slope_label(fit: Mapping[str, Any], group: str) -> str:
    ci = fit.get("ci")
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    prefix = f"{group}: " if group else ""
    return f"{prefix}slope {fit['slope']:.3f}{interval}, n={fit['n_points']}"


def scaling_plot(analysis: Mapping[str, Any], x: str, title: str) -> bytes:
    """The sweep's power-law fits against ``x``: runs as points, the fit as a line."""
    fits = [f for f in analysis.get("fits", []) if f["x"] == x and f["kind"] == "power"]
    panels = _scaling_panels(fits, x)
    if not panels:
        raise NothingToPlot(f"no scaling-law fits against {x!r} (is it swept with ≥ 2 values?)")
    runs = {r["id"]: r for r in analysis.get("runs", [])}
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.6 * cols, 3.8 * rows)
    palette = Palette(None, [_group_text(f["group"]) for f in fits])
    for i, y in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for fit in (f for f in fits if f["y"] == y):
            group = _group_text(fit["group"])
            color = palette.color(group)
            xs = [float(runs[r]["overrides"][x]) for r in fit["run_ids"]]
            ys = [runs[r]["quantities"][y] for r in fit["run_ids"]]
            ax.scatter(xs, ys, color=color, s=16, alpha=0.8)
            grid = [min(xs) * (max(xs) / min(xs)) ** (t / 20) for t in range(21)]
            line = [math.exp(fit["intercept"]) * g ** fit["slope"] for g in grid]
            ax.plot(grid, line, color=color, lw=1.4, label=_slope_label(fit, group))
            reference = fit.get("reference_slope")
            if reference is not None:
                gx = math.exp(sum(math.log(v) for v in xs) / len(xs))
                gy = math.exp(fit["intercept"]) * gx ** fit["slope"]
                guide = [gy * (g / gx) ** reference for g in grid]
                ax.plot(
                    grid,
                    guide,
                    color="grey",
                    ls="--",
                    lw=1,
                    label=f"theory: slope {reference:g} ({fit.get('reference_kind')})",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_title(y, fontsize=10)
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _png(fig)


def _group_text(group: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in group.items())


# -- from the database -------------------------------------------------------------------------


def _series(
    db_session: Session, run_id: int, names: Sequence[str]
) -> dict[str, list[tuple[int, Any]]]:
    return history.run_series(
        db_session=db_session, run_id=run_id, names=names, max_points=PLOT_POINTS
    )


def _split(points: Sequence[tuple[int, Any]]) -> tuple[list[float], list[float]]:
    return [float(s) for s, _ in points], [math.nan if v is None else float(v) for _, v in points]


def _layer_names(db_session: Session, run_ids: Sequence[int]) -> list[str]:
    names: dict[str, list[Any]] = {}
    for run_id in run_ids:
        for name in history.run_metric_names(db_session=db_session, run_id=run_id):
            names.setdefault(name, [])
    return layer_names(names)


def _curves(
    db_session: Session, runs: Sequence[Run], color_by: str | None, kind: str
) -> tuple[list[Curve], dict[str, list[Curve]]]:
    """(curves for loss / lambda_min, curves per layer for movement) of ``runs``."""
    curves: list[Curve] = []
    by_layer: dict[str, list[Curve]] = {}
    layers = _layer_names(db_session, [r.id for r in runs]) if kind == "movement" else []
    prefix = LAYER_METRICS["weight_dist_rel"]
    for run in runs:
        value = run.overrides.get(color_by) if color_by else f"run {run.id}"
        if kind == "loss":
            data = _series(db_session, run.id, [LOSS, PREDICTED_LOSS])
            if LOSS in data:
                predicted = _split(data[PREDICTED_LOSS]) if PREDICTED_LOSS in data else None
                curves.append(Curve(run.id, value, *_split(data[LOSS]), predicted=predicted))
        elif kind == "lambda_min":
            data = _series(db_session, run.id, [GRAM_H_MIN, LAMBDA_MIN, LAMBDA0])
            watched = GRAM_H_MIN if GRAM_H_MIN in data else LAMBDA_MIN  # Du's G⁽ᴴ⁾ vs λ₀
            if watched in data:
                steps, values = _split(data[watched])
                lambda0 = data.get(LAMBDA0, [(0, None)])[0][1] or values[0]
                if lambda0 and lambda0 > 0:
                    curves.append(Curve(run.id, value, steps, [v / lambda0 for v in values]))
        else:
            data = _series(db_session, run.id, [prefix + layer for layer in layers])
            for layer in layers:
                if prefix + layer in data:
                    by_layer.setdefault(layer, []).append(
                        Curve(run.id, value, *_split(data[prefix + layer]))
                    )
    return curves, by_layer


def default_color_by(runs: Sequence[Run]) -> str | None:
    """The swept parameter to colour by: width if swept, else the first non-seed one."""
    records = [RunRecord(r.id, r.status, r.config, r.overrides or {}, {}) for r in runs]
    swept = [k for k in swept_parameters(records) if k not in SEED_KEYS]
    if "width" in swept:
        return "width"
    return swept[0] if swept else None


def render(
    db_session: Session, runs: Sequence[Run], kind: str, color_by: str | None, title: str
) -> bytes:
    curves, by_layer = _curves(db_session, runs, color_by, kind)
    palette = Palette(
        color_by, [c.value for c in curves] or [c.value for cs in by_layer.values() for c in cs]
    )
    if kind == "loss":
        return loss_plot(curves, palette, title)
    if kind == "lambda_min":
        return lambda_min_plot(curves, palette, title)
    return movement_plot(by_layer, palette, title)


def sweep_plot(
    *,
    db_session: Session,
    sweep_id: int,
    kind: str,
    color_by: str | None = None,
    x: str = "width",
    loss_threshold: float | None = None,
) -> bytes:
    """A PNG of one kind for a whole sweep."""
    sweep = get_sweep(db_session=db_session, sweep_id=sweep_id)
    title = f"sweep {sweep.id} ({sweep.name})"
    if kind == "scaling":
        records = sweep_records(
            db_session=db_session, sweep_id=sweep_id, loss_threshold=loss_threshold
        )
        return scaling_plot(analyze_sweep(records), x, f"{title}: scaling against {x}")
    runs = list(db_session.scalars(select(Run).where(Run.sweep_id == sweep_id).order_by(Run.id)))
    color_by = color_by or default_color_by(runs)
    started = [r for r in runs if r.status != "queued"]
    return render(db_session, started, kind, color_by, f"{title}: {kind.replace('_', ' ')}")


def run_plot(*, db_session: Session, run_id: int, kind: str) -> bytes:
    """A PNG of one kind for one run."""
    run = get_run(db_session=db_session, run_id=run_id)
    return render(db_session, [run], kind, None, f"run {run.id}: {kind.replace('_', ' ')}")
