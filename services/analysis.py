"""Run analysis: one finished (or running) run held against what the theory predicts.

:func:`analyze_run` is pure — metric points and the run config in, a JSON-ready dict out — so
the dispatcher stores it in a run's summary (under ``"analysis"``) when the run finishes and the
API recomputes it on demand from the stored history (:func:`run_analysis`). It reports:

- the fitted linear convergence rate: OLS slope of ln L(k) against k over the late phase (the
  second half of the steps before the loss meets the float floor), with its standard error,
  95% Student-t interval and r²; the theory's rate 2·ln(1 − η λ_min(H(0))) (Arora et al. 2019;
  SCIENCE.md) and Du's bound ln(1 − η λ₀/2) per step (Du et al. ICLR 2019, ICML 2019);
- steps to reach a loss threshold (the config's ``loss_threshold``, else 10⁻³ · L(0));
- min over training of λ_min(H(k)) / λ_min(H(0)) and whether λ_min(H(k)) ≥ λ₀/2 held;
- final weight movement per layer (absolute, relative, /√m, max per neuron), pattern flips, the
  relative change of the NTK and of G⁽ᴴ⁾;
- whether the run stayed in the regime the theorems assume (width vs n, activation smoothness,
  step size vs λ₀ and η·λ_max(H(k)) over the whole run, parallel inputs, GD on the squared
  loss);
- flags, the caveats a reader must not miss: the edge of stability (η·λ_max(H(k)) reached 2,
  with the step it crossed), a kernel that moved (‖H(k) − H(0)‖_F/‖H(0)‖_F past
  ``KERNEL_MOVED``), and a fitted rate that disagrees with the theory's by more than
  ``RATE_DISAGREEMENT``.

Every number is finite or None (PostgreSQL's JSONB refuses NaN).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from services import history
from services.fits import fit_line
from services.models import Run
from worker.metric_names import (
    DUPLICATE_PAIRS,
    GENERALIZATION,
    GRAM_H_CHANGE,
    GRAM_H_MIN,
    LAMBDA0,
    LAMBDA_MAX,
    LAMBDA_MIN,
    LAYER_METRICS,
    LOSS,
    NTK_CHANGE,
    PARALLEL_PAIRS,
    PREDICTED_LOSS,
    RUN_LR,
    Y_HINV_Y,
)

ANALYSIS_VERSION = 2
LATE_FRACTION = 0.5  # the rate is fitted over the last half of the pre-floor steps
LOSS_FLOOR = 1e-12  # relative to L(0): below it float rounding, not GD, sets the curve
DEFAULT_RELATIVE_THRESHOLD = 1e-3  # steps to reach 10⁻³ · L(0) when the config sets none
ANALYSIS_MAX_POINTS = 20_000  # per metric read for an analysis (exact below this many steps)
SMOOTH_ACTIVATIONS = frozenset({"softplus", "tanh", "gelu"})
STABILITY_LIMIT = 2.0  # GD on the linearized model converges iff η·λ_max(H) < 2
KERNEL_MOVED = 0.1  # max_k ‖H(k) − H(0)‖_F / ‖H(0)‖_F past this: the kernel did not stay put
RATE_DISAGREEMENT = 2.0  # fitted / theory rate outside [1/this, this] is flagged
ODD_ACTIVATIONS = frozenset({"tanh"})  # f(−x) = −f(x): antiparallel inputs give λ₀ = 0

Points = Sequence[tuple[int, float | None]]  # (step, value), step order; None is NaN


def finite(value: float | None) -> float | None:
    """``value`` if it is a finite number, else None (what JSON summaries store)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _sorted(points: Points | None) -> list[tuple[int, float]]:
    return sorted((int(s), math.nan if v is None else float(v)) for s, v in points or ())


def _first(points: Points | None) -> float | None:
    pts = _sorted(points)
    return finite(pts[0][1]) if pts else None


def _last(points: Points | None) -> float | None:
    pts = _sorted(points)
    return finite(pts[-1][1]) if pts else None


def _log(value: float | None) -> float | None:
    return math.log(value) if value is not None and value > 0 else None


def step_size(config: Mapping[str, Any], points: Mapping[str, Points]) -> float | None:
    """η: the config's ``lr``, or the worker's reported ``run/lr`` (``lr: auto``)."""
    lr = config.get("lr")
    if isinstance(lr, int | float) and not isinstance(lr, bool):
        return float(lr)
    return _first(points.get(RUN_LR))


def late_phase(loss: Points) -> tuple[np.ndarray, np.ndarray]:
    """(steps, ln L) of the late phase: the last ``LATE_FRACTION`` of the steps from the first
    point to the last one before the loss first drops to ``LOSS_FLOOR`` · L(0)."""
    pts = [(s, v) for s, v in _sorted(loss) if math.isfinite(v)]
    if not pts or pts[0][1] <= 0:
        return np.empty(0), np.empty(0)
    floor = pts[0][1] * LOSS_FLOOR
    end = next((i for i, (_, v) in enumerate(pts) if v <= floor), len(pts))
    pts = pts[:end]
    if not pts:
        return np.empty(0), np.empty(0)
    first, last = pts[0][0], pts[-1][0]
    start = last - LATE_FRACTION * (last - first)
    late = [(s, v) for s, v in pts if s >= start]
    return np.array([s for s, _ in late], float), np.log([v for _, v in late])


def linear_rate(
    eta: float | None, lam_min: float | None, lam_max: float | None = None
) -> float | None:
    """2·ln max(|1 − ηλ_min|, |1 − ηλ_max|): the per-step change of ln L of GD on the model
    linearized with a kernel of extreme eigenvalues λ_min, λ_max, once its slowest mode
    dominates. That is λ_min's mode unless η·λ_max is near 2 (past 2 − η·λ_min the top mode
    contracts more slowly; past 2 it grows and the rate is positive)."""
    if eta is None or lam_min is None:
        return None
    factor = max(abs(1 - eta * lam) for lam in (lam_min, lam_max) if lam is not None)
    return 2 * math.log(factor) if factor > 0 else None


def _window_mean(points: Points, steps: np.ndarray) -> float | None:
    """The mean of the finite values of ``points`` at steps within [steps[0], steps[-1]]."""
    if not len(steps):
        return None
    window = [v for s, v in _sorted(points) if steps[0] <= s <= steps[-1] and math.isfinite(v)]
    return float(np.mean(window)) if window else None


def convergence(
    loss: Points,
    eta: float | None,
    spec: Mapping[str, Any],
    lam_min: Points = (),
    lam_max: Points = (),
) -> dict[str, Any]:
    """The fitted late-phase rate of ln L per step next to the theory's and Du's bound.

    The theory's rate is :func:`linear_rate` of H(0) (``spec``'s λ_min and λ_max of H(0)).
    ``late_theory_rate`` uses the mean λ_min(H(k)) and λ_max(H(k)) over the fit's steps
    instead: it tells a finite width's drifting kernel from a wrong rate."""
    steps, log_loss = late_phase(loss)
    fit = fit_line(steps, log_loss)
    theory = linear_rate(eta, spec["lambda_min_initial"], spec["lambda_max_initial"])
    late_lam = _window_mean(lam_min, steps)
    lambda0 = spec["lambda0"]
    du_factor = 1 - eta * lambda0 / 2 if eta is not None and lambda0 is not None else None
    du_rate = math.log(du_factor) if du_factor is not None and 0 < du_factor < 1 else None
    fitted = fit.slope if fit is not None else None
    return {
        "fitted_rate": fitted,
        "fit": fit.as_dict() if fit is not None else None,
        "fit_steps": [int(steps[0]), int(steps[-1])] if len(steps) else None,
        "fitted_factor": math.exp(fitted) if fitted is not None else None,
        "theory_rate": theory,
        "rate_ratio": fitted / theory if fitted is not None and theory else None,
        "late_lambda_min": late_lam,
        "late_theory_rate": linear_rate(eta, late_lam, _window_mean(lam_max, steps)),
        "du_factor": finite(du_factor),
        "du_rate_bound": du_rate,
        "within_du_bound": (fitted <= du_rate) if fitted is not None and du_rate else None,
    }


def steps_to_threshold(loss: Points, threshold: float) -> int | None:
    """The first step whose loss is at or below ``threshold`` (None: never)."""
    return next((s for s, v in _sorted(loss) if math.isfinite(v) and v <= threshold), None)


def threshold_for(
    config: Mapping[str, Any], initial_loss: float | None, override: float | None
) -> tuple[float | None, str]:
    """(threshold, where it came from): the caller's, the config's, or 10⁻³ · L(0)."""
    if override is not None:
        return override, "request"
    configured = config.get("loss_threshold")
    if isinstance(configured, int | float) and configured > 0:
        return float(configured), "config"
    if initial_loss is None:
        return None, "none"
    return DEFAULT_RELATIVE_THRESHOLD * initial_loss, "relative"


def _finite_points(points: Points | None) -> list[tuple[int, float]]:
    return [(s, v) for s, v in _sorted(points) if math.isfinite(v)]


def _edge_of_stability(eta: float | None, lam_max: Points | None) -> dict[str, Any]:
    """η·λ_max(H(k)) over the whole run: its largest value, that value's step, and the first
    step at which it reached ``STABILITY_LIMIT`` (None: never)."""
    scaled = [(s, eta * v) for s, v in _finite_points(lam_max)] if eta is not None else []
    peak = max(scaled, key=lambda point: point[1]) if scaled else None
    return {
        "eta_lambda_max_max": finite(peak[1]) if peak else None,
        "eta_lambda_max_max_step": peak[0] if peak else None,
        "edge_of_stability_step": next((s for s, v in scaled if v >= STABILITY_LIMIT), None),
    }


def spectrum(points: Mapping[str, Points], eta: float | None) -> dict[str, Any]:
    """λ_min(H(k)) over training against λ_min(H(0)), Du's G⁽ᴴ⁾(k) against λ₀, and
    η·λ_max(H(k)) against the stability limit 2 over the whole run.

    λ₀ is λ_min of the last hidden layer's infinite-width kernel, so the theorems' condition
    λ_min(G⁽ᴴ⁾(k)) ≥ λ₀/2 is checked on G⁽ᴴ⁾ (the NTK itself for ``two_layer``); without it,
    or without λ₀, on the NTK against λ_min(H(0))/2."""
    lam = _finite_points(points.get(LAMBDA_MIN))
    lam0 = lam[0][1] if lam else None
    lam_min = min(v for _, v in lam) if lam else None
    lambda0 = _first(points.get(LAMBDA0))
    lam_max0 = _first(points.get(LAMBDA_MAX))
    gram_h = [v for _, v in _finite_points(points.get(GRAM_H_MIN))]
    watched: float | None
    reference: float | None
    if lambda0 is not None and lambda0 > 0 and (gram_h or lam):
        watched, reference = min(gram_h) if gram_h else lam_min, lambda0
    else:
        watched, reference = lam_min, lam0
    return {
        "lambda_min_initial": finite(lam0),
        "lambda_min_min": finite(lam_min),
        "lambda_min_final": finite(lam[-1][1]) if lam else None,
        "lambda_min_min_ratio": finite(lam_min / lam0) if lam_min is not None and lam0 else None,
        "gram_H_lambda_min_min": finite(min(gram_h)) if gram_h else None,
        "lambda_max_initial": lam_max0,
        "lambda0": lambda0,
        "eta": eta,
        "eta_lambda0": finite(eta * lambda0) if eta is not None and lambda0 is not None else None,
        "eta_lambda_max_initial": finite(eta * lam_max0)
        if eta is not None and lam_max0 is not None
        else None,
        **_edge_of_stability(eta, points.get(LAMBDA_MAX)),
        "stays_above_half_lambda0": (watched >= reference / 2)
        if watched is not None and reference
        else None,
    }


def layer_names(points: Mapping[str, Points]) -> list[str]:
    """The layers with laziness metrics, in the worker's order (layer1 … layerH, out)."""
    layers = {
        name[len(prefix) :]
        for name in points
        for prefix in LAYER_METRICS.values()
        if name.startswith(prefix)
    }

    def order(layer: str) -> tuple[int, int, str]:
        digits = layer.removeprefix("layer")
        return (1, 0, layer) if not digits.isdigit() else (0, int(digits), layer)

    return sorted(layers, key=order)


def movement(points: Mapping[str, Points]) -> dict[str, Any]:
    """Final weight distances and pattern flips per layer; final and largest Gram changes."""
    layers = {
        layer: {
            key: _last(points.get(prefix + layer))
            for key, prefix in LAYER_METRICS.items()
            if prefix + layer in points
        }
        for layer in layer_names(points)
    }
    ntk = _finite_points(points.get(NTK_CHANGE))
    return {
        "layers": layers,
        "ntk_rel_change": finite(ntk[-1][1]) if ntk else None,
        "ntk_rel_change_max": finite(max(v for _, v in ntk)) if ntk else None,
        "kernel_moved_step": next((s for s, v in ntk if v > KERNEL_MOVED), None),
        "gram_H_rel_change": _last(points.get(GRAM_H_CHANGE)),
    }


def measured_distance(layers: Mapping[str, Mapping[str, Any]]) -> float | None:
    """‖θ(K) − θ(0)‖₂ over every trained layer: √(Σ_l ‖W⁽ˡ⁾(K) − W⁽ˡ⁾(0)‖_F²)."""
    distances = [v["weight_dist"] for v in layers.values() if v.get("weight_dist") is not None]
    return math.sqrt(sum(d * d for d in distances)) if distances else None


def theory_comparison(
    points: Mapping[str, Points], final_loss: float | None, layers: Mapping[str, Any]
) -> dict[str, Any]:
    """Arora et al.'s predictions (distance √(yᵀΘ⁻¹y), the linearized loss curve) vs the run.

    Θ is the whole network's infinite-width NTK, so the distance it predicts is that of every
    trained parameter: the measured one is summed over all layers, not layer 1's alone."""
    y_hinv_y = _first(points.get(Y_HINV_Y))
    predicted = _last(points.get(PREDICTED_LOSS))
    distance = math.sqrt(y_hinv_y) if y_hinv_y is not None and y_hinv_y >= 0 else None
    measured = measured_distance(layers)
    return {
        "y_Hinv_y": y_hinv_y,
        "generalization_bound": _first(points.get(GENERALIZATION)),
        "predicted_distance": distance,
        "measured_distance": measured,
        "distance_ratio": finite(measured / distance) if measured and distance else None,
        "predicted_final_loss": predicted,
        "final_loss_ratio": finite(final_loss / predicted) if final_loss and predicted else None,
    }


def _check(name: str, ok: bool | None, value: Any, requirement: str) -> dict[str, Any]:
    return {"name": name, "ok": ok, "value": value, "requirement": requirement}


def regime(
    config: Mapping[str, Any], points: Mapping[str, Points], spec: Mapping[str, Any]
) -> dict[str, Any]:
    """Did the run stay where the theorems apply? Each check: ok (None: unknown), value, what
    the papers assume. The papers' width and step-size conditions are worst-case sufficient
    conditions (m = Ω(n⁶/λ₀⁴δ³), η = O(λ₀/n²) for two layers); the checks are the practical
    ones, and the worst-case ratios are reported as values."""
    arch, activation = config.get("arch"), config.get("activation")
    width, data = config.get("width"), config.get("data") or {}
    n = data.get("n") if isinstance(data, Mapping) else None
    lambda0, eta = spec.get("lambda0"), spec.get("eta")
    checks = []
    if isinstance(width, int) and isinstance(n, int):
        checks.append(
            _check("width_vs_n", width >= n, width / n, "m ≥ n (the papers: m = poly(n))")
        )
    if arch is not None and activation is not None:
        smooth = activation in SMOOTH_ACTIVATIONS
        ok = True if arch == "two_layer" else smooth
        need = (
            "ReLU or smooth (Du et al. ICLR 2019)"
            if arch == "two_layer"
            else "analytic, Lipschitz and smooth (Du et al. ICML 2019): not ReLU"
        )
        checks.append(_check("activation", ok, activation, need))
    if spec.get("eta_lambda_max_max") is not None:
        value = spec["eta_lambda_max_max"]
        checks.append(
            _check(
                "step_size_stable", value < STABILITY_LIMIT, value, "η·λ_max(H(k)) < 2 for all k"
            )
        )
    if spec.get("eta_lambda0") is not None:
        value = spec["eta_lambda0"]
        checks.append(_check("step_size_vs_lambda0", 0 < value <= 1, value, "0 < η·λ₀ ≤ 1"))
        if isinstance(n, int) and lambda0 and eta:
            worst = eta * n * n / lambda0
            checks.append(_check("step_size_worst_case", None, worst, "η·n²/λ₀ = O(1)"))
    if spec.get("stays_above_half_lambda0") is not None:
        checks.append(
            _check(
                "lambda_min_stays",
                spec["stays_above_half_lambda0"],
                spec.get("gram_H_lambda_min_min") or spec.get("lambda_min_min"),
                "λ_min(G⁽ᴴ⁾(k)) ≥ λ₀/2 for all k",
            )
        )
    duplicates, parallel = (_first(points.get(name)) for name in (DUPLICATE_PAIRS, PARALLEL_PAIRS))
    if duplicates is not None or parallel is not None:
        # duplicates make every kernel singular; antiparallel pairs only an odd σ's (tanh:
        # f(−x) = −f(x)), not ReLU's, softplus's or gelu's (H^∞_ij = 0 at cos = −1 for ReLU)
        antiparallel = (parallel or 0) - (duplicates or 0)
        count = (duplicates or 0) + (antiparallel if activation in ODD_ACTIVATIONS else 0)
        need = "no duplicate inputs, nor antiparallel ones for an odd σ (else λ₀ = 0)"
        checks.append(_check("distinct_inputs", count == 0, count, need))
    if "loss" in config or "optimizer" in config:
        case = f"{config.get('loss', 'mse')}/{config.get('optimizer', 'gd')}"
        checks.append(_check("objective", case == "mse/gd", case, "full-batch GD on ½‖u − y‖²"))
    known = [c["ok"] for c in checks if c["ok"] is not None]
    return {"in_regime": all(known) if known else None, "checks": checks}


def _flag(name: str, value: Any, step: int | None, message: str) -> dict[str, Any]:
    return {"name": name, "value": value, "step": step, "message": message}


def flags(
    spec: Mapping[str, Any], conv: Mapping[str, Any], moved: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The caveats of a run (name, value, step, message): the edge of stability, a kernel
    that moved, and a fitted rate the theory's does not describe."""
    out = []
    if spec.get("edge_of_stability_step") is not None:
        peak = spec["eta_lambda_max_max"]
        out.append(
            _flag(
                "edge_of_stability",
                peak,
                spec["edge_of_stability_step"],
                f"η·λ_max(H(k)) reached {peak:.3g} (crossed 2 at step "
                f"{spec['edge_of_stability_step']}): past the linearized model's stable range",
            )
        )
    if moved.get("kernel_moved_step") is not None:
        change = moved["ntk_rel_change_max"]
        out.append(
            _flag(
                "kernel_moved",
                change,
                moved["kernel_moved_step"],
                f"‖H(k) − H(0)‖_F/‖H(0)‖_F reached {change:.3g} (past {KERNEL_MOVED:g} at step "
                f"{moved['kernel_moved_step']}): not the lazy kernel regime",
            )
        )
    ratio = conv.get("rate_ratio")
    if ratio is not None and not 1 / RATE_DISAGREEMENT <= ratio <= RATE_DISAGREEMENT:
        out.append(
            _flag(
                "rate_vs_theory",
                ratio,
                None,
                f"the fitted rate is {ratio:.3g} × the theory's 2·ln max|1 − ηλ(H(0))| "
                f"(outside ×/÷ {RATE_DISAGREEMENT:g}): the linearized model does not describe it",
            )
        )
    return out


def analyze_run(
    points_by_metric: Mapping[str, Points],
    config: Mapping[str, Any],
    *,
    loss_threshold: float | None = None,
) -> dict[str, Any]:
    """The analysis of one run from its metric points ({name: [(step, value), …]}) and config.

    Pure and deterministic; any metric may be missing (its entries are then None).
    """
    loss = points_by_metric.get(LOSS, ())
    losses = _sorted(loss)
    initial, final = (finite(losses[0][1]), finite(losses[-1][1])) if losses else (None, None)
    eta = step_size(config, points_by_metric)
    spec = spectrum(points_by_metric, eta)
    threshold, source = threshold_for(config, initial, loss_threshold)
    reached = steps_to_threshold(loss, threshold) if threshold is not None else None
    moved = movement(points_by_metric)
    conv = convergence(
        loss,
        eta,
        spec,
        points_by_metric.get(LAMBDA_MIN, ()),
        points_by_metric.get(LAMBDA_MAX, ()),
    )
    return {
        "version": ANALYSIS_VERSION,
        "steps_done": losses[-1][0] if losses else None,
        "initial_loss": initial,
        "final_loss": final,
        "convergence": conv,
        "threshold": {
            "loss_threshold": threshold,
            "source": source,
            "steps_to_threshold": reached,
            "reached": reached is not None,
        },
        "spectrum": spec,
        "movement": moved,
        "theory": theory_comparison(points_by_metric, final, moved["layers"]),
        "regime": regime(config, points_by_metric, spec),
        "flags": flags(spec, conv, moved),
    }


# -- from the database -------------------------------------------------------------------------


def analysis_metric_names(names: Sequence[str]) -> list[str]:
    """The metrics of a run that :func:`analyze_run` reads (not spectra, timings, gradients)."""
    wanted = {LOSS, LAMBDA_MIN, LAMBDA_MAX, NTK_CHANGE, GRAM_H_MIN, GRAM_H_CHANGE, PREDICTED_LOSS}
    wanted |= {LAMBDA0, Y_HINV_Y, GENERALIZATION, RUN_LR, DUPLICATE_PAIRS, PARALLEL_PAIRS}
    prefixes = tuple(LAYER_METRICS.values())
    return [name for name in names if name in wanted or name.startswith(prefixes)]


def load_points(
    *, db_session: Session, run_id: int, names: Sequence[str] | None = None
) -> dict[str, list[tuple[int, float | None]]]:
    """{metric: [(step, value), …]} of the analysis metrics of a run (or of ``names``), each
    downsampled to ``ANALYSIS_MAX_POINTS`` (exact for shorter histories)."""
    if names is None:
        names = analysis_metric_names(
            history.run_metric_names(db_session=db_session, run_id=run_id)
        )
    if not names:
        return {}
    return history.run_series(
        db_session=db_session, run_id=run_id, names=names, max_points=ANALYSIS_MAX_POINTS
    )


def run_analysis(
    *, db_session: Session, run: Run, loss_threshold: float | None = None, recompute: bool = False
) -> dict[str, Any]:
    """The run's stored analysis when it is final and current, else computed from its metrics."""
    stored = (run.summary or {}).get("analysis")
    if (
        not recompute
        and loss_threshold is None
        and isinstance(stored, dict)
        and stored.get("version") == ANALYSIS_VERSION
        and run.status in ("succeeded", "diverged", "failed", "cancelled")
    ):
        return stored
    points = load_points(db_session=db_session, run_id=run.id)
    return analyze_run(points, run.config or {}, loss_threshold=loss_threshold)
