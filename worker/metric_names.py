"""The names of the metrics a run reports: one torch-free catalogue for the worker that emits
them and the service that reads them (formulas: ``docs/metrics.md``).

Names are stable strings (the store takes any name). Per-layer names end in the layer's name:
``layer1`` … ``layerH`` for W⁽¹⁾…W⁽ᴴ⁾ and ``out`` for a.
"""

from __future__ import annotations

# every step
LOSS = "loss"
RESIDUAL_NORM = "residual_norm"
ACCURACY = "accuracy"
GRAD_NORM = "grad_norm"
STEP_TIME = "step_time_s"
# every gram_every steps
LAMBDA_MIN = "ntk_lambda_min"
LAMBDA_MAX = "ntk_lambda_max"
NTK_CHANGE = "ntk_rel_change"
GRAM_H_MIN = "gram_H_lambda_min"
GRAM_H_MAX = "gram_H_lambda_max"
GRAM_H_CHANGE = "gram_H_rel_change"
FULL_NTK_MIN = "ntk_full_lambda_min"  # several outputs: the whole nC×nC NTK
FULL_NTK_MAX = "ntk_full_lambda_max"
# every theory_every steps: the linearized predictions (worker/baseline.py)
PREDICTED_LOSS = "theory/predicted_loss"
PREDICTED_LOSS_H0 = "theory/predicted_loss_h0"
# per-run constants, at step 0
PARAMETER_COUNT = "run/parameter_count"
RUN_LR = "run/lr"
C_SIGMA = "run/c_sigma"
DUPLICATE_PAIRS = "data/duplicate_pairs"
PARALLEL_PAIRS = "data/parallel_pairs"
MAX_ABS_COSINE = "data/max_abs_cosine"
MIN_SEPARATION = "data/min_separation"
SEPARATION_RATIO = "data/min_separation_ratio"
KERNEL_ERROR = "theory/kernel_error_estimate"
LAMBDA0 = "theory/lambda0"
ETA_LAMBDA0 = "theory/eta_lambda0"
DU_RATE_BOUND = "theory/du_rate_bound"
H0_RATE = "theory/h0_rate"
NTK_INF_MIN = "theory/ntk_inf_lambda_min"
NTK_INF_MAX = "theory/ntk_inf_lambda_max"
Y_HINV_Y = "theory/y_Hinv_y"
GENERALIZATION = "theory/generalization_bound"

# every weights_every steps, per layer: the prefix, then the layer's name
LAYER_METRICS = {
    "weight_dist": "weight_dist/",
    "weight_dist_rel": "weight_dist_rel/",
    "weight_dist_per_sqrt_m": "weight_dist_per_sqrt_m/",
    "neuron_dist_max": "neuron_dist_max/",
    "pattern_flips": "pattern_flips/",
}


def layer_metric(kind: str, layer: str) -> str:
    """The name of a per-layer metric (``kind`` a key of LAYER_METRICS) of one layer."""
    return LAYER_METRICS[kind] + layer


def gram_layer_names(layer: str) -> tuple[str, str]:
    """Names of λ_min and λ_max of one layer's Gram (with ``gram_per_layer``)."""
    return f"gram/{layer}/lambda_min", f"gram/{layer}/lambda_max"


def spectrum_name(gram: str, index: int) -> str:
    """The index-th smallest eigenvalue of ``gram`` (ntk, gram_H, ntk_inf)."""
    return f"spectrum/{gram}/{index}"
