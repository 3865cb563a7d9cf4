"""The figures of :mod:`services.plots`, drawn from plain data (matplotlib's object API on an
Agg canvas: no pyplot, no global state, thread-safe per figure).

Curves over training steps (theory dashed and clipped to the data's range), per-layer movement
panels, and scaling-law panels: log–log for a power law, semilog where the exponential fit is
the better model, ticks at the swept values. Colour encodes one parameter, line style or
marker a second; every axis is labelled from :mod:`services.quantities`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, MaxNLocator, NullLocator

from services.errors import NotFound
from services.quantities import label
from worker.metric_names import LAYER_METRICS, PREDICTED_LOSS

DPI = 100
MAX_SCALING_PANELS = 6
MAX_TICKS = 7
CLIP_MARGIN = 3.0  # a log axis spans the data's range ×/÷ this; theory curves are cut there
LINESTYLES: tuple[Any, ...] = ("-", "-.", ":", (0, (6, 1, 1, 1, 1, 1)))  # "--" is the theory's
MARKERS = ("o", "s", "^", "D", "v", "P")
_SCALING_ORDER = ("neuron_dist_max", "weight_dist_rel", "pattern_flips", "ntk_rel_change")


class NothingToPlot(NotFound):
    """The runs have none of the metrics the plot shows (yet): a 404 over the API."""


@dataclass(frozen=True)
class Curve:
    """One run's series of one quantity; ``value`` and ``style`` are the values of its colour
    and style parameters."""

    run_id: int
    value: Any
    steps: Sequence[float]
    values: Sequence[float]
    predicted: tuple[Sequence[float], Sequence[float]] | None = None
    style: Any = None


def _distinct(values: Sequence[Any]) -> tuple[list[Any], bool]:
    """(distinct values, sorted if all are numbers; whether they are)."""
    distinct = {repr(v): v for v in values}
    numeric = bool(distinct) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in distinct.values()
    )
    return (sorted(distinct.values()) if numeric else list(distinct.values())), numeric


@dataclass
class Palette:
    """Colours for the values of one parameter: a log scale for positive numbers."""

    name: str | None
    values: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ordered, self.numeric = _distinct(self.values)
        low, high = (min(self.ordered), max(self.ordered)) if self.numeric else (0, 0)
        if self.numeric and low > 0 and high > low:
            self.norm: Normalize | None = LogNorm(low, high)
        elif self.numeric and high > low:
            self.norm = Normalize(low, high)
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


@dataclass
class Styles:
    """Line styles and markers for the values of a second parameter (none: solid, circles)."""

    name: str | None
    values: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.ordered = _distinct(self.values)[0] if self.name else []

    def _index(self, value: Any) -> int:
        keys = [repr(v) for v in self.ordered]
        return keys.index(repr(value)) if repr(value) in keys else 0

    def linestyle(self, value: Any) -> Any:
        return LINESTYLES[self._index(value) % len(LINESTYLES)]

    def marker(self, value: Any) -> str:
        return MARKERS[self._index(value) % len(MARKERS)]

    def handles(self, lines: bool = True) -> list[Line2D]:
        if len(self.ordered) < 2:
            return []
        return [
            Line2D(
                [],
                [],
                color="dimgrey",
                ls=self.linestyle(v) if lines else "none",
                marker=None if lines else self.marker(v),
                label=f"{self.name} = {v}",
            )
            for v in self.ordered
        ]


def _figure(width: float, height: float) -> Figure:
    """A figure on its own Agg canvas: no pyplot, no global backend state."""
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
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


def _clip_to_data(ax: Axes, values: Sequence[float]) -> None:
    """Limit a log y axis to the data's range (×/÷ ``CLIP_MARGIN``): a theory curve that falls
    to 1e-36 must not squash the measured curves into the top of the panel."""
    if values:
        ax.set_ylim(min(values) / CLIP_MARGIN, max(values) * CLIP_MARGIN)


def curves_figure(
    curves: Sequence[Curve],
    palette: Palette,
    styles: Styles,
    title: str,
    ylabel: str,
    *,
    reference: float | None = None,
    reference_label: str = "",
    log_y: bool = True,
) -> Figure:
    """Curves over training steps, their predictions dashed in the same colour."""
    if not curves:
        raise NothingToPlot(f"nothing to plot for {title}")
    fig = _figure(7, 4.5)
    ax = fig.add_subplot()
    has_prediction, shown = False, []
    for curve in curves:
        xs, ys = _positive(curve.steps, curve.values) if log_y else (curve.steps, curve.values)
        shown += [v for v in ys if v is not None and math.isfinite(v)]
        style = styles.linestyle(curve.style)
        ax.plot(xs, ys, color=palette.color(curve.value), lw=1.2, alpha=0.85, ls=style)
        if curve.predicted is not None:
            px, py = _positive(*curve.predicted)
            ax.plot(px, py, color=palette.color(curve.value), lw=1.0, ls="--", alpha=0.9)
            has_prediction = True
    handles = palette.handles() + styles.handles()
    if has_prediction:
        handles.append(Line2D([], [], color="grey", ls="--", label=label(PREDICTED_LOSS)))
    if reference is not None:
        ax.axhline(reference, color="black", ls=":", lw=1)
        handles.append(Line2D([], [], color="black", ls=":", label=reference_label))
    if log_y:
        ax.set_yscale("log")
        _clip_to_data(ax, shown)
    ax.set_xlabel("step k")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(handles=handles, fontsize=8, loc="best")
    return fig


def movement_figure(
    curves_by_layer: Mapping[str, Sequence[Curve]], palette: Palette, styles: Styles, title: str
) -> Figure:
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
            color, style = palette.color(curve.value), styles.linestyle(curve.style)
            ax.plot(xs, ys, color=color, lw=1.1, alpha=0.85, ls=style)
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=10)
        ax.set_xlabel("step k")
        ax.grid(True, alpha=0.3)
        if i % cols == 0:
            ax.set_ylabel(label(LAYER_METRICS["weight_dist_rel"]))
    fig.axes[0].legend(handles=palette.handles() + styles.handles(), fontsize=7)
    fig.suptitle(title)
    return fig


# -- scaling laws ------------------------------------------------------------------------------


def scaling_panels(fits: Sequence[Mapping[str, Any]], wanted: Sequence[str] | None) -> list[str]:
    """The quantities to draw: ``wanted`` (each must have a fit), else up to
    ``MAX_SCALING_PANELS``, laziness first, leaving out a panel identical to one before it
    (G⁽ᴴ⁾ is the NTK of a two-layer net)."""
    signature: dict[str, str] = {}
    for f in fits:
        signature[f["y"]] = signature.get(f["y"], "") + f"{f['slope']!r},{f['intercept']!r};"
    if wanted:
        missing = [y for y in wanted if y not in signature]
        if missing:
            raise NothingToPlot(
                f"no fit of {', '.join(missing)}; the fitted quantities are "
                f"{', '.join(sorted(signature))}"
            )
        return list(dict.fromkeys(wanted))

    def order(name: str) -> tuple[int, str]:
        base = name.split("/")[0]
        return (_SCALING_ORDER.index(base) if base in _SCALING_ORDER else 99, name)

    panels: list[str] = []
    for y in sorted(signature, key=order):
        if signature[y] not in {signature[p] for p in panels}:
            panels.append(y)
    return panels[:MAX_SCALING_PANELS]


def better_fit(fits: Sequence[Mapping[str, Any]]) -> Mapping[str, Any]:
    """Of one group's fits of one quantity (power law, exponential), the one with the higher r²."""
    return max(fits, key=lambda f: f["r2"])


def _model(fit: Mapping[str, Any], x: float) -> float:
    if fit["kind"] == "exponential":
        return math.exp(fit["intercept"] + fit["slope"] * x)
    return math.exp(fit["intercept"]) * x ** fit["slope"]


def _slope_label(fit: Mapping[str, Any], group: str, x: str) -> str:
    ci = fit.get("ci")
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""
    prefix = f"{group}: " if group else ""
    law = f"∝ e^(b·{x})" if fit["kind"] == "exponential" else f"∝ {x}^b"
    return f"{prefix}{law}, b = {fit['slope']:.3f}{interval}, n={fit['n_points']}"


def _ticks_at(ax: Axes, values: Sequence[float], log_x: bool) -> None:
    """Clean x ticks: on a log axis at the swept values (at most ``MAX_TICKS``, evenly
    thinned) without the minor labels that collide there; on a linear one at integers when
    the values are (depths)."""
    if not log_x:
        integer = all(float(v).is_integer() for v in values)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=MAX_TICKS, integer=integer))
        return
    distinct = sorted(set(values))
    step = math.ceil(len(distinct) / MAX_TICKS)
    ax.set_xticks(distinct[::step])
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_locator(NullLocator())


@dataclass(frozen=True)
class GroupStyle:
    """Colour by a group's first parameter, marker by its second."""

    keys: list[str]
    palette: Palette
    styles: Styles

    @classmethod
    def of(cls, groups: Sequence[Mapping[str, Any]]) -> GroupStyle:
        keys = list(groups[0]) if groups else []
        first = keys[0] if keys else None
        second = keys[1] if len(keys) > 1 else None
        return cls(
            keys,
            Palette(first, [g.get(first) for g in groups] if first else []),
            Styles(second, [g.get(second) for g in groups] if second else []),
        )

    def color(self, group: Mapping[str, Any]) -> Any:
        return self.palette.color(group.get(self.keys[0]) if self.keys else None)

    def _second(self, group: Mapping[str, Any]) -> Any:
        return group.get(self.keys[1]) if len(self.keys) > 1 else None

    def marker(self, group: Mapping[str, Any]) -> str:
        return self.styles.marker(self._second(group))

    def linestyle(self, group: Mapping[str, Any]) -> Any:
        return self.styles.linestyle(self._second(group))


def _scaling_panel(
    ax: Axes,
    fits: Sequence[Mapping[str, Any]],
    runs: Mapping[int, Mapping[str, Any]],
    x: str,
    look: GroupStyle,
) -> None:
    """One quantity against x: each group's runs as points and its better model as a line;
    semilog axes when the exponential is the better model of any group."""
    by_group: dict[str, list[Mapping[str, Any]]] = {}
    for fit in fits:
        by_group.setdefault(_group_text(fit["group"]), []).append(fit)
    chosen = [better_fit(group_fits) for group_fits in by_group.values()]
    semilog = any(f["kind"] == "exponential" for f in chosen)
    every_x: list[float] = []
    for fit in chosen:
        xs = [float(runs[r]["overrides"][x]) for r in fit["run_ids"]]
        ys = [runs[r]["quantities"][fit["y"]] for r in fit["run_ids"]]
        every_x += xs
        color, marker = look.color(fit["group"]), look.marker(fit["group"])
        ax.scatter(xs, ys, color=color, marker=marker, s=18, alpha=0.8)
        low, high = min(xs), max(xs)
        grid = [low + (high - low) * t / 40 for t in range(41)]
        if not semilog:
            grid = [low * (high / low) ** (t / 40) for t in range(41)]
        text = _slope_label(fit, _group_text(fit["group"]), x)
        line = [_model(fit, g) for g in grid]
        ax.plot(grid, line, color=color, ls=look.linestyle(fit["group"]), lw=1.4, label=text)
        _reference_guide(ax, fit, xs, grid)
    if not semilog:
        ax.set_xscale("log")
    ax.set_yscale("log")
    _ticks_at(ax, every_x, not semilog)


def _reference_guide(
    ax: Axes, fit: Mapping[str, Any], xs: Sequence[float], grid: Sequence[float]
) -> None:
    """The theory's slope through the fit's geometric centre, dashed grey."""
    reference = fit.get("reference_slope")
    if reference is None or fit["kind"] != "power":
        return
    gx = math.exp(sum(math.log(v) for v in xs) / len(xs))
    gy = _model(fit, gx)
    guide = [gy * (g / gx) ** reference for g in grid]
    text = f"theory: slope {reference:g} ({fit.get('reference_kind')})"
    ax.plot(grid, guide, color="grey", ls="--", lw=1, label=text)


def scaling_figure(
    analysis: Mapping[str, Any], x: str, title: str, wanted: Sequence[str] | None = None
) -> Figure:
    """The sweep's fits against ``x``: runs as points, each group's better model as a line."""
    fits = [f for f in analysis.get("fits", []) if f["x"] == x]
    panels = scaling_panels(fits, wanted)
    if not panels:
        raise NothingToPlot(f"no scaling-law fits against {x!r} (is it swept with ≥ 2 values?)")
    runs = {r["id"]: r for r in analysis.get("runs", [])}
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig = _figure(4.8 * cols, 4.0 * rows)
    look = GroupStyle.of([f["group"] for f in fits])
    for i, y in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        _scaling_panel(ax, [f for f in fits if f["y"] == y], runs, x, look)
        ax.set_xlabel(label(x))
        ax.set_ylabel(label(y), fontsize=9)
        ax.set_title(f"y = {y}", fontsize=9)
        ax.grid(True, which="major", alpha=0.25)
        ax.legend(fontsize=7)
    shown = len(panels)
    total = len({f["y"] for f in fits})
    more = f" ({shown} of {total} quantities; choose with y=)" if shown < total else ""
    fig.suptitle(title + more)
    return fig


def _group_text(group: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in group.items())
