"""PNG plots of runs and sweeps.

Kinds: ``loss`` (loss curves on a log axis, the theory's linearized prediction dashed and
clipped to the data's range), ``lambda_min`` (λ_min(H(k)) of the empirical NTK, the
``ntk_lambda_min`` the dashboard charts too), ``lambda0_ratio`` (λ_min(G⁽ᴴ⁾(k)) / λ₀, Du's
last-hidden-layer Gram, which is the NTK of a two-layer net, with the λ₀/2 line the theorems
keep it above), ``scaling`` (the sweep's fits, each quantity on log–log axes, or on semilog
axes where the exponential fit is the better model; ``y`` chooses the quantities) and
``movement`` (‖W⁽ʰ⁾(k) − W⁽ʰ⁾(0)‖_F / ‖W⁽ʰ⁾(0)‖_F of each layer over training).

Colour encodes one swept parameter (``color_by``, default width) and line style or marker a
second one. The figures are drawn by :mod:`services.figures` from plain data; this module
gathers the data from the database.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services import history
from services.analysis import layer_names
from services.figures import (
    Curve,
    Palette,
    Styles,
    curves_figure,
    movement_figure,
    png,
    scaling_figure,
)
from services.models import Run
from services.quantities import LAMBDA0_RATIO, label
from services.runs import get_run, get_sweep
from services.sweep_analysis import (
    SEED_KEYS,
    RunRecord,
    analyze_sweep,
    sweep_records,
    swept_parameters,
)
from worker.metric_names import GRAM_H_MIN, LAMBDA0, LAMBDA_MIN, LAYER_METRICS, LOSS, PREDICTED_LOSS

SWEEP_KINDS: tuple[str, ...] = ("loss", "lambda_min", LAMBDA0_RATIO, "scaling", "movement")
RUN_KINDS: tuple[str, ...] = ("loss", "lambda_min", LAMBDA0_RATIO, "movement")
PLOT_POINTS = 600  # points per series (downsampled: min and max per bucket survive)


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


def _lambda0_ratio(data: Mapping[str, list[tuple[int, Any]]]) -> tuple[list[float], list[float]]:
    """λ_min(G⁽ᴴ⁾(k)) / λ₀ (the NTK's λ_min against its own initial value without them)."""
    watched = GRAM_H_MIN if GRAM_H_MIN in data else LAMBDA_MIN
    if watched not in data:
        return [], []
    steps, values = _split(data[watched])
    lambda0 = data.get(LAMBDA0, [(0, None)])[0][1] or values[0]
    if not lambda0 or not lambda0 > 0:
        return [], []
    return steps, [v / lambda0 for v in values]


def run_curves(db_session: Session, run: Run, kind: str, value: Any, style: Any) -> list[Curve]:
    """One run's curve for a ``loss``, ``lambda_min`` or ``lambda0_ratio`` plot (or none)."""
    if kind == "loss":
        data = _series(db_session, run.id, [LOSS, PREDICTED_LOSS])
        if LOSS not in data:
            return []
        predicted = _split(data[PREDICTED_LOSS]) if PREDICTED_LOSS in data else None
        return [Curve(run.id, value, *_split(data[LOSS]), predicted=predicted, style=style)]
    if kind == "lambda_min":
        data = _series(db_session, run.id, [LAMBDA_MIN])
        return [Curve(run.id, value, *_split(data[LAMBDA_MIN]), style=style)] if data else []
    steps, ratio = _lambda0_ratio(_series(db_session, run.id, [GRAM_H_MIN, LAMBDA_MIN, LAMBDA0]))
    return [Curve(run.id, value, steps, ratio, style=style)] if steps else []


def movement_curves(
    db_session: Session, runs: Sequence[Run], keys: tuple[str | None, str | None]
) -> dict[str, list[Curve]]:
    """Each layer's relative weight movement curves of ``runs``."""
    layers = _layer_names(db_session, [r.id for r in runs])
    prefix = LAYER_METRICS["weight_dist_rel"]
    by_layer: dict[str, list[Curve]] = {}
    for run in runs:
        value, style = _values(run, keys)
        data = _series(db_session, run.id, [prefix + layer for layer in layers])
        for layer in layers:
            if prefix + layer in data:
                curve = Curve(run.id, value, *_split(data[prefix + layer]), style=style)
                by_layer.setdefault(layer, []).append(curve)
    return by_layer


def _values(run: Run, keys: tuple[str | None, str | None]) -> tuple[Any, Any]:
    """A run's values of the colour and style parameters (no colour parameter: its id)."""
    color_by, style_by = keys
    overrides = run.overrides or {}
    value = overrides.get(color_by) if color_by else f"run {run.id}"
    return value, overrides.get(style_by) if style_by else None


def default_keys(runs: Sequence[Run], color_by: str | None) -> tuple[str | None, str | None]:
    """(colour, style) parameters: ``color_by`` or width if swept, else the first non-seed
    swept parameter; the style is the next non-seed swept parameter."""
    records = [RunRecord(r.id, r.status, r.config, r.overrides or {}, {}) for r in runs]
    swept = [k for k in swept_parameters(records) if k not in SEED_KEYS]
    if color_by is None:
        color_by = "width" if "width" in swept else (swept[0] if swept else None)
    style_by = next((k for k in swept if k != color_by), None)
    return color_by, style_by


def render(
    db_session: Session,
    runs: Sequence[Run],
    kind: str,
    keys: tuple[str | None, str | None],
    title: str,
) -> bytes:
    """A PNG of one kind (not ``scaling``) of ``runs``, coloured and styled by ``keys``."""
    color_by, style_by = keys
    if kind == "movement":
        by_layer = movement_curves(db_session, runs, keys)
        every = [c for cs in by_layer.values() for c in cs]
        palette = Palette(color_by, [c.value for c in every])
        styles = Styles(style_by, [c.style for c in every])
        return png(movement_figure(by_layer, palette, styles, title))
    curves = [c for run in runs for c in run_curves(db_session, run, kind, *_values(run, keys))]
    palette = Palette(color_by, [c.value for c in curves])
    styles = Styles(style_by, [c.style for c in curves])
    if kind != LAMBDA0_RATIO:
        ylabel = label(LOSS) if kind == "loss" else label(LAMBDA_MIN)
        return png(curves_figure(curves, palette, styles, title, ylabel))
    figure = curves_figure(
        curves,
        palette,
        styles,
        title,
        label(LAMBDA0_RATIO),
        reference=0.5,
        reference_label="λ₀/2 (Du et al.)",
        log_y=False,
    )
    return png(figure)


def sweep_plot(
    *,
    db_session: Session,
    sweep_id: int,
    kind: str,
    color_by: str | None = None,
    x: str = "width",
    y: Sequence[str] | None = None,
    loss_threshold: float | None = None,
) -> bytes:
    """A PNG of one kind for a whole sweep (``y``: the scaling plot's quantities)."""
    sweep = get_sweep(db_session=db_session, sweep_id=sweep_id)
    title = f"sweep {sweep.id} ({sweep.name})"
    if kind == "scaling":
        records = sweep_records(
            db_session=db_session, sweep_id=sweep_id, loss_threshold=loss_threshold
        )
        analysis = analyze_sweep(records)
        return png(scaling_figure(analysis, x, f"{title}: scaling against {label(x)}", y))
    runs = list(db_session.scalars(select(Run).where(Run.sweep_id == sweep_id).order_by(Run.id)))
    keys = default_keys(runs, color_by)
    started = [r for r in runs if r.status != "queued"]
    return render(db_session, started, kind, keys, f"{title}: {_kind_title(kind)}")


def _kind_title(kind: str) -> str:
    titles = {"loss": LOSS, "lambda_min": LAMBDA_MIN, "movement": "relative weight movement"}
    return label(titles.get(kind, kind))


def run_plot(*, db_session: Session, run_id: int, kind: str) -> bytes:
    """A PNG of one kind for one run."""
    run = get_run(db_session=db_session, run_id=run_id)
    return render(db_session, [run], kind, (None, None), f"run {run.id}: {_kind_title(kind)}")
