"""One name per quantity: the label every view (PNG plots, the dashboard, the CLI) shows for a
metric or an analysis quantity, keyed by the name the API uses for it.

Metric names come from :mod:`worker.metric_names`; analysis quantities are the keys of
:func:`services.sweep_analysis.run_quantities`. A per-layer name (``weight_dist_rel/layer2``)
is labelled by its prefix plus the layer. A name without an entry is its own label.
"""

from __future__ import annotations

from worker.metric_names import (
    ACCURACY,
    GRAD_NORM,
    GRAM_H_CHANGE,
    GRAM_H_MAX,
    GRAM_H_MIN,
    LAMBDA0,
    LAMBDA_MAX,
    LAMBDA_MIN,
    LAYER_METRICS,
    LOSS,
    NTK_CHANGE,
    PREDICTED_LOSS,
    PREDICTED_LOSS_H0,
    RESIDUAL_NORM,
    STEP_TIME,
    Y_HINV_Y,
)

LAMBDA0_RATIO = "lambda0_ratio"  # λ_min(G⁽ᴴ⁾(k)) / λ₀: Du's condition, a derived series

LABELS: dict[str, str] = {
    # metrics, over training
    LOSS: "L(k)",
    RESIDUAL_NORM: "‖y − u(k)‖",
    ACCURACY: "accuracy",
    GRAD_NORM: "‖∇L(θ(k))‖",
    STEP_TIME: "step time (s)",
    LAMBDA_MIN: "λ_min(H(k))",
    LAMBDA_MAX: "λ_max(H(k))",
    NTK_CHANGE: "‖H(k) − H(0)‖_F / ‖H(0)‖_F",
    GRAM_H_MIN: "λ_min(G⁽ᴴ⁾(k))",
    GRAM_H_MAX: "λ_max(G⁽ᴴ⁾(k))",
    GRAM_H_CHANGE: "‖G⁽ᴴ⁾(k) − G⁽ᴴ⁾(0)‖_F / ‖G⁽ᴴ⁾(0)‖_F",
    PREDICTED_LOSS: "L(k) linearized on H^∞",
    PREDICTED_LOSS_H0: "L(k) linearized on H(0)",
    LAMBDA0: "λ₀",
    Y_HINV_Y: "yᵀ(H^∞)⁻¹y",
    LAMBDA0_RATIO: "λ_min(G⁽ᴴ⁾(k)) / λ₀",
    # run analysis quantities
    "initial_loss": "L(0)",
    "final_loss": "final loss L(K)",
    "fitted_rate": "fitted rate (ln L per step)",
    "theory_rate": "theory rate 2·ln max|1 − ηλ(H(0))|",
    "late_theory_rate": "theory rate on late H(k)",
    "rate_ratio": "fitted / theory rate",
    "du_rate_bound": "Du bound ln(1 − ηλ₀/2)",
    "steps_to_threshold": "steps to threshold",
    "lambda_min_initial": "λ_min(H(0))",
    "lambda_min_min": "min_k λ_min(H(k))",
    "lambda_min_min_ratio": "min_k λ_min(H(k)) / λ_min(H(0))",
    "late_lambda_min": "mean λ_min(H(k)) late",
    "lambda0": "λ₀",
    "eta_lambda_max_max": "max_k η·λ_max(H(k))",
    "y_Hinv_y": "yᵀ(H^∞)⁻¹y",
    "distance_ratio": "‖θ(K) − θ(0)‖ / √(yᵀ(H^∞)⁻¹y)",
    "ntk_rel_change_max": "max_k ‖H(k) − H(0)‖_F / ‖H(0)‖_F",
    "within_du_bound": "fitted rate within Du's bound",
    "loss_threshold": "loss threshold",
    "steps_done": "steps done",
    "eta": "step size η",
    "eta_lambda0": "η·λ₀",
    "eta_lambda_max_initial": "η·λ_max(H(0))",
    "edge_of_stability_step": "step where η·λ_max(H(k)) crossed 2",
    "stays_above_half_lambda0": "λ_min(G⁽ᴴ⁾(k)) ≥ λ₀/2 throughout",
    "predicted_distance": "√(yᵀ(H^∞)⁻¹y)",
    "measured_distance": "‖θ(K) − θ(0)‖",
    "predicted_final_loss": "final L(K) linearized on H^∞",
    "final_loss_ratio": "final L(K) / linearized",
}
LAYER_LABELS: dict[str, str] = {
    LAYER_METRICS["weight_dist"]: "‖W − W(0)‖_F",
    LAYER_METRICS["weight_dist_rel"]: "‖W − W(0)‖_F / ‖W(0)‖_F",
    LAYER_METRICS["weight_dist_per_sqrt_m"]: "‖W − W(0)‖_F / √m",
    LAYER_METRICS["neuron_dist_max"]: "max_r ‖w_r − w_r(0)‖",
    LAYER_METRICS["pattern_flips"]: "pattern-flip fraction",
}
PARAMETER_LABELS: dict[str, str] = {"width": "width m", "depth": "depth H", "lr": "step size η"}


def label(name: str) -> str:
    """The label of a metric, an analysis quantity or a swept parameter."""
    if name in LABELS:
        return LABELS[name]
    for prefix, text in LAYER_LABELS.items():
        if name.startswith(prefix):
            return f"{text}, {name.removeprefix(prefix)}"
    return PARAMETER_LABELS.get(name, name)


def catalogue() -> dict[str, dict[str, str]]:
    """Every label, for the dashboard: whole names and per-layer prefixes."""
    return {"names": LABELS | PARAMETER_LABELS, "prefixes": LAYER_LABELS}
