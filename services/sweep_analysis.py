"""Sweep analysis: runs side by side, aggregated over seeds, and scaling laws on log–log axes.

:func:`analyze_sweep` is pure: run records (config, overrides, status, run analysis from
:mod:`services.analysis`) in, a JSON-ready dict out.

- Groups: runs with the same values of the swept parameters other than seeds (``seed``,
  ``data.seed``); each quantity over the group's final runs as mean, sample standard
  deviation, min, max, count, median and — for a positive quantity spanning decades, like a
  final loss — the geometric mean, which is the one to read (``spans_decades``). Runs still
  queued or running are counted as ``pending``, never averaged as if final.
- Scaling laws: for a swept numeric parameter x and a quantity y, the OLS fit of ln y on ln x
  over the succeeded runs (every seed a point), separately for each combination of the other
  swept parameters, with the slope's 95% Student-t interval and the number of points. Width:
  relative weight change, pattern flips and max per-neuron distance of each layer, relative
  NTK and G⁽ᴴ⁾ change, steps to the threshold (laziness, Du et al. ICLR 2019: ≈ m^−½ for the
  two-layer net). Depth: steps to the threshold and λ_min(H(0)), both as a power law and as an
  exponential ln y = a + b·H (FC needs exponentially more, ResNet polynomially; Du et al. ICML
  2019).
- The smallest width at which every run (and any run) reached the loss threshold.
- True vs random labels (a swept ``data.label_noise`` or ``data.labels``): yᵀ(H^∞)⁻¹y and the
  convergence speed side by side (Arora et al. ICML 2019).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.analysis import run_analysis
from services.fits import fit_line, fit_power_law
from services.models import Run
from services.runs import get_sweep
from worker.metric_names import LAYER_METRICS

SEED_KEYS = ("seed", "data.seed")
AXES = ("arch", "width", "depth", "activation", "data.label_noise", "data.labels", "data.n", "lr")
LABEL_KEYS = ("data.label_noise", "data.labels")
FINISHED = ("succeeded", "diverged")  # a run that trained to its end (threshold questions)
FINAL = frozenset({"succeeded", "diverged", "failed", "cancelled"})
DECADES = 10.0  # max/min of a positive quantity past this: report its geometric mean
LAZINESS = ("weight_dist_rel", "pattern_flips", "neuron_dist_max")
# quantity -> (slope, kind) against width for the two-layer net (Du et al. ICLR 2019). A
# "prediction" is how the quantity scales: max_r ‖w_r(k) − w_r(0)‖ = O(1/√m), flips ∝ that
# radius, ‖W(k) − W(0)‖_F = O(1) while ‖W(0)‖_F ∝ √m. A "bound" only bounds it from above
# (‖H(k) − H(0)‖ = O(n·radius)): any steeper slope agrees with it.
TWO_LAYER_WIDTH_SLOPES = {
    **{f"{key}/layer1": (-0.5, "prediction") for key in (*LAZINESS, "weight_dist_per_sqrt_m")},
    "ntk_rel_change": (-0.5, "bound"),
    "gram_H_rel_change": (-0.5, "bound"),
}
SCALING_TARGETS: dict[str, tuple[str, ...]] = {
    "width": (
        *(f"{key}/*" for key in LAZINESS),
        "ntk_rel_change",
        "gram_H_rel_change",
        "steps_to_threshold",
    ),
    "depth": ("steps_to_threshold", "lambda_min_initial", "lambda0"),
}
DEFAULT_TARGETS = ("steps_to_threshold",)
EXPONENTIAL_IN = frozenset({"depth"})  # also fit ln y = a + b·x

_PATHS: dict[str, tuple[str, ...]] = {
    "final_loss": ("final_loss",),
    "fitted_rate": ("convergence", "fitted_rate"),
    "theory_rate": ("convergence", "theory_rate"),
    "late_theory_rate": ("convergence", "late_theory_rate"),
    "rate_ratio": ("convergence", "rate_ratio"),
    "du_rate_bound": ("convergence", "du_rate_bound"),
    "late_lambda_min": ("convergence", "late_lambda_min"),
    "steps_to_threshold": ("threshold", "steps_to_threshold"),
    "lambda_min_initial": ("spectrum", "lambda_min_initial"),
    "lambda_min_min_ratio": ("spectrum", "lambda_min_min_ratio"),
    "lambda0": ("spectrum", "lambda0"),
    "eta_lambda_max_max": ("spectrum", "eta_lambda_max_max"),
    "y_Hinv_y": ("theory", "y_Hinv_y"),
    "distance_ratio": ("theory", "distance_ratio"),
    "ntk_rel_change": ("movement", "ntk_rel_change"),
    "ntk_rel_change_max": ("movement", "ntk_rel_change_max"),
    "gram_H_rel_change": ("movement", "gram_H_rel_change"),
}


@dataclass(frozen=True)
class RunRecord:
    """What the sweep analysis knows of one run."""

    id: int
    status: str
    config: Mapping[str, Any]
    overrides: Mapping[str, Any]
    analysis: Mapping[str, Any]


def _dig(tree: Any, path: Sequence[str]) -> Any:
    for key in path:
        if not isinstance(tree, Mapping):
            return None
        tree = tree.get(key)
    return tree


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def run_quantities(analysis: Mapping[str, Any]) -> dict[str, float | None]:
    """The scalar quantities of one run analysis, per-layer ones as ``<metric>/<layer>``."""
    out = {name: _number(_dig(analysis, path)) for name, path in _PATHS.items()}
    layers = _dig(analysis, ("movement", "layers")) or {}
    for layer, values in layers.items():
        for key in LAYER_METRICS:
            out[f"{key}/{layer}"] = _number(values.get(key))
    return out


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)


def swept_parameters(runs: Sequence[RunRecord]) -> list[str]:
    """Override keys whose value differs between runs: the usual axes first, seeds last, the
    rest by name (PostgreSQL's JSONB keeps no key order, so the spec's order is lost)."""
    keys = {k for run in runs for k in run.overrides}
    swept = [k for k in keys if len({_key(r.overrides.get(k)) for r in runs}) > 1]

    def order(key: str) -> tuple[int, int, str]:
        if key in SEED_KEYS:
            return (2, SEED_KEYS.index(key), key)
        return (0, AXES.index(key), key) if key in AXES else (1, 0, key)

    return sorted(swept, key=order)


def _numeric(runs: Sequence[RunRecord], key: str) -> bool:
    return all(_number(r.overrides.get(key)) is not None for r in runs)


def group_runs(
    runs: Sequence[RunRecord], keys: Sequence[str]
) -> list[tuple[dict[str, Any], list[RunRecord]]]:
    """Runs with equal values of ``keys``, groups in order of first appearance."""
    groups: dict[str, tuple[dict[str, Any], list[RunRecord]]] = {}
    for run in runs:
        params = {k: run.overrides.get(k) for k in keys}
        groups.setdefault(_key(params), (params, []))[1].append(run)
    return list(groups.values())


NO_STATS: Mapping[str, Any] = {
    "mean": None, "std": None, "sem": None, "min": None, "max": None, "n": 0,
    "median": None, "geomean": None, "geostd": None, "spans_decades": False,
}  # fmt: skip


def describe(values: Sequence[float | None]) -> dict[str, Any]:
    """Mean, sample standard deviation (n ≥ 2), standard error, min, max, count, median, and
    for positive values their geometric mean, geometric standard deviation (the factor
    e^std(ln x)) and whether they span ≥ ``DECADES`` (then the arithmetic mean is the largest
    value's, and the geometric mean is the one to read)."""
    xs = np.array([v for v in values if v is not None], float)
    if not len(xs):
        return dict(NO_STATS)
    std = float(xs.std(ddof=1)) if len(xs) > 1 else None
    positive = bool((xs > 0).all())
    logs = np.log(xs) if positive else None
    return {
        "mean": float(xs.mean()),
        "std": std,
        "sem": std / math.sqrt(len(xs)) if std is not None else None,
        "min": float(xs.min()),
        "max": float(xs.max()),
        "n": len(xs),
        "median": float(np.median(xs)),
        "geomean": float(np.exp(logs.mean())) if logs is not None else None,
        "geostd": float(np.exp(logs.std(ddof=1))) if logs is not None and len(xs) > 1 else None,
        "spans_decades": positive and float(xs.max()) >= DECADES * float(xs.min()),
    }


def _status_counts(runs: Sequence[RunRecord]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for run in runs:
        counts[run.status] = counts.get(run.status, 0) + 1
    return counts


def flag_counts(runs: Sequence[RunRecord]) -> dict[str, int]:
    """How many of ``runs`` raised each analysis flag."""
    counts: dict[str, int] = {}
    for run in runs:
        for flag in run.analysis.get("flags") or []:
            counts[flag["name"]] = counts.get(flag["name"], 0) + 1
    return counts


def aggregate(runs: Sequence[RunRecord], keys: Sequence[str]) -> list[dict[str, Any]]:
    """One row per group of ``keys``: its runs, their states, how many are not final yet, the
    flags its runs raised, and every quantity of its final runs described."""
    rows = []
    for params, members in group_runs(runs, keys):
        final = [r for r in members if r.status in FINAL]
        quantities = [run_quantities(r.analysis) for r in final]
        names = sorted({name for q in quantities for name in q})
        rows.append(
            {
                "params": params,
                "run_ids": [r.id for r in members],
                "status_counts": _status_counts(members),
                "pending": len(members) - len(final),
                "flags": flag_counts(final),
                "stats": {name: describe([q.get(name) for q in quantities]) for name in names},
            }
        )
    return rows


def _targets(x: str, available: set[str]) -> list[str]:
    out: list[str] = []
    for target in SCALING_TARGETS.get(x, DEFAULT_TARGETS):
        if target.endswith("/*"):
            prefix = target[:-1]
            out += sorted(name for name in available if name.startswith(prefix))
        elif target in available:
            out.append(target)
    return out


def _architecture(members: Sequence[RunRecord]) -> str | None:
    archs = {str(r.config.get("arch")) for r in members}
    return archs.pop() if len(archs) == 1 else None


def _pairs(
    members: Sequence[tuple[RunRecord, dict[str, float | None]]], x: str, y: str
) -> tuple[list[float], list[float], list[int]]:
    """(x, y, run id) of the runs with a positive y (the points of a log–log fit)."""
    xs, ys, ids = [], [], []
    for run, quantities in members:
        value = quantities.get(y)
        if value is not None and value > 0:
            xs.append(float(run.overrides[x]))
            ys.append(value)
            ids.append(run.id)
    return xs, ys, ids


def _fit_entries(
    x: str,
    y: str,
    params: dict[str, Any],
    arch: str | None,
    points: tuple[list[float], list[float], list[int]],
) -> list[dict[str, Any]]:
    """The power-law fit of y against x (and for depth the exponential one) as dicts."""
    xs, ys, ids = points
    fits = [("power", fit_power_law(xs, ys))]
    if x in EXPONENTIAL_IN:
        fits.append(("exponential", fit_line(xs, np.log(ys))))
    out = []
    for kind, fit in fits:
        if fit is None:
            continue
        reference, reference_kind = None, None
        if kind == "power" and x == "width" and arch == "two_layer":
            reference, reference_kind = TWO_LAYER_WIDTH_SLOPES.get(y, (None, None))
        consistent = None
        if reference is not None and fit.ci_low is not None and fit.ci_high is not None:
            consistent = fit.ci_low <= reference and (
                reference_kind == "bound" or reference <= fit.ci_high
            )
        out.append(
            {"x": x, "y": y, "kind": kind, "group": params, "run_ids": ids}
            | fit.as_dict()
            | {
                "reference_slope": reference,
                "reference_kind": reference_kind,
                "consistent_with_reference": consistent,
            }
        )
    return out


def scaling_fits(runs: Sequence[RunRecord], swept: Sequence[str]) -> list[dict[str, Any]]:
    """Power laws (and for depth exponentials) of each quantity against each numeric swept
    parameter, one fit per combination of the other non-seed swept parameters."""
    done = [r for r in runs if r.status == "succeeded"]
    others = [k for k in swept if k not in SEED_KEYS]
    fits: list[dict[str, Any]] = []
    for x in others:
        if not done or not _numeric(done, x):
            continue
        for params, members in group_runs(done, [k for k in others if k != x]):
            quantities = [(r, run_quantities(r.analysis)) for r in members]
            available = {name for _, q in quantities for name, v in q.items() if v is not None}
            arch = _architecture(members)
            for y in _targets(x, available):
                fits += _fit_entries(x, y, params, arch, _pairs(quantities, x, y))
    return fits


def smallest_widths(runs: Sequence[RunRecord], swept: Sequence[str]) -> list[dict[str, Any]]:
    """Per group of the other swept parameters: how many runs of each width reached the loss
    threshold, and the smallest width at which all (and any) did."""
    if "width" not in swept:
        return []
    finished = [r for r in runs if r.status in FINISHED]
    others = [k for k in swept if k not in SEED_KEYS and k != "width"]
    out = []
    for params, members in group_runs(finished, others):
        by_width: dict[float, list[bool]] = {}
        for r in members:
            reached = bool(_dig(r.analysis, ("threshold", "reached")))
            by_width.setdefault(float(r.overrides["width"]), []).append(reached)
        rows = [
            {"width": int(w), "reached": sum(flags), "runs": len(flags)}
            for w, flags in sorted(by_width.items())
        ]
        out.append(
            {
                "group": params,
                "widths": rows,
                "smallest_width_all": next(
                    (r["width"] for r in rows if r["reached"] == r["runs"]), None
                ),
                "smallest_width_any": next((r["width"] for r in rows if r["reached"]), None),
            }
        )
    return out


def label_comparison(runs: Sequence[RunRecord], swept: Sequence[str]) -> dict[str, Any] | None:
    """True vs random labels side by side: yᵀ(H^∞)⁻¹y, fitted rate, steps to the threshold."""
    key = next((k for k in LABEL_KEYS if k in swept), None)
    if key is None:
        return None
    finished = [r for r in runs if r.status in FINISHED]
    others = [k for k in swept if k not in SEED_KEYS and k != key]
    shown = ("y_Hinv_y", "fitted_rate", "theory_rate", "steps_to_threshold", "final_loss")
    comparisons = []
    for params, members in group_runs(finished, others):
        rows = []
        for label_params, subset in group_runs(members, [key]):
            quantities = [run_quantities(r.analysis) for r in subset]
            rows.append(
                {"value": label_params[key], "run_ids": [r.id for r in subset]}
                | {name: describe([q.get(name) for q in quantities]) for name in shown}
            )
        comparisons.append({"group": params, "rows": rows})
    return {"param": key, "comparisons": comparisons}


def analyze_sweep(runs: Sequence[RunRecord]) -> dict[str, Any]:
    """Groups over seeds, scaling-law fits, smallest widths and the label comparison."""
    swept = swept_parameters(runs)
    group_keys = [k for k in swept if k not in SEED_KEYS]
    return {
        "swept": swept,
        "group_by": group_keys,
        "status_counts": _status_counts(runs),
        "groups": aggregate(runs, group_keys),
        "fits": scaling_fits(runs, swept),
        "smallest_width": smallest_widths(runs, swept),
        "labels": label_comparison(runs, swept),
        "runs": [
            {
                "id": r.id,
                "status": r.status,
                "overrides": dict(r.overrides),
                "quantities": run_quantities(r.analysis),
                "in_regime": _dig(r.analysis, ("regime", "in_regime")),
                "flags": r.analysis.get("flags") or [],
            }
            for r in runs
        ],
    }


def sweep_records(
    *,
    db_session: Session,
    sweep_id: int,
    loss_threshold: float | None = None,
    recompute: bool = False,
) -> list[RunRecord]:
    """Every run of the sweep with its analysis (stored, or recomputed from its metrics)."""
    get_sweep(db_session=db_session, sweep_id=sweep_id)
    runs = db_session.scalars(select(Run).where(Run.sweep_id == sweep_id).order_by(Run.id))
    return [
        RunRecord(
            id=run.id,
            status=run.status,
            config=run.config or {},
            overrides=run.overrides or {},
            analysis=run_analysis(
                db_session=db_session, run=run, loss_threshold=loss_threshold, recompute=recompute
            )
            if run.status != "queued"
            else {},
        )
        for run in runs
    ]


def sweep_analysis(
    *,
    db_session: Session,
    sweep_id: int,
    loss_threshold: float | None = None,
    recompute: bool = False,
) -> dict[str, Any]:
    """The analysis of every run of a sweep, put side by side."""
    sweep = get_sweep(db_session=db_session, sweep_id=sweep_id)
    records = sweep_records(
        db_session=db_session, sweep_id=sweep_id, loss_threshold=loss_threshold, recompute=recompute
    )
    return {"sweep_id": sweep.id, "name": sweep.name} | analyze_sweep(records)
