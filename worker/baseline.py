"""What a run measures against, computed once at θ(0): the reference for every "change since
initialization" metric, the step size, and the per-run constants reported at step 0.

Computed again when a run resumes from a checkpoint (from the checkpoint's θ(0), bitwise the
same on CPU), so a checkpoint need not carry n×n matrices. Constants: parameter count, η (with
``lr: auto``, η = lr_fraction · 2/λ_max(H(0)), the GD stability limit of the linearized model),
c_σ, the inputs' separation (:mod:`worker.separation`, with Allen-Zhu et al.'s width bound), and
the theory of :mod:`worker.theory` on the kernels of :mod:`worker.kernels` (Du et al. ICLR/ICML
2019, Arora et al. ICML 2019).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worker import metric_names as catalogue
from worker.activations import c_sigma
from worker.config import RunConfig
from worker.data import Dataset
from worker.gram import layer_grams
from worker.kernels import infinite_width_kernels
from worker.metric_names import PREDICTED_LOSS, PREDICTED_LOSS_H0, spectrum_name
from worker.metrics import Point, activation_pattern
from worker.models import OUTPUT_LAYER, Network
from worker.spectra import ExtremeEigenvalues
from worker.theory import EigenDecomposition, LinearizedLossCurve


@dataclass(frozen=True)
class Baseline:
    """State at θ(0): trained weights (on the run's device), activation patterns per trained
    hidden layer, the NTK H(0) and the last hidden layer's G⁽ᴴ⁾(0) (n×n float64; None when
    W⁽ᴴ⁾ is not trained), the state_dict (CPU, for checkpoints), the step size η, linearized
    loss curves by metric name, and the step-0 constants."""

    weights: list[torch.Tensor]
    patterns: list[torch.Tensor]
    ntk: torch.Tensor
    last_hidden: torch.Tensor | None
    state: dict[str, torch.Tensor]
    lr: float
    curves: dict[str, LinearizedLossCurve]
    constants: list[Point]


def last_hidden_gram(
    cfg: RunConfig, net: Network, grams: list[torch.Tensor]
) -> torch.Tensor | None:
    """G⁽ᴴ⁾ among the trained layers' Grams, or None when W⁽ᴴ⁾ is fixed (``train_layers``)."""
    name = f"layer{cfg.depth}"
    return grams[net.layer_names.index(name)] if name in net.layer_names else None


def allen_zhu_separation_ratio(cfg: RunConfig, delta: float) -> float:
    """δ/δ*, δ* = (n²⁴ L¹² / m)^{1/8}: the least separation Allen-Zhu et al.'s width bound
    m ≥ n²⁴L¹²δ⁻⁸ (Theorem 1, constants and logarithms dropped) covers at this width, with
    L = max(H − 1, 1) hidden m×m layers. ≥ 1 when the width meets the bound."""
    n, layers = cfg.data.n, max(cfg.depth - 1, 1)
    required = math.exp((24 * math.log(n) + 12 * math.log(layers) - math.log(cfg.width)) / 8)
    return delta / required


def measure_baseline(cfg: RunConfig, net: Network, X: torch.Tensor, data: Dataset) -> Baseline:
    """Everything at θ(0) for ``net`` (which must hold θ(0)) on inputs X, targets ``data.y``."""
    fwd = net.forward_layers(X)
    grams = layer_grams(fwd)
    ntk = torch.stack(grams).sum(dim=0)
    names = net.layer_names
    hidden = [z for z, name in zip(fwd.preacts, names, strict=True) if name != OUTPUT_LAYER]
    if cfg.lr == "auto":
        lam_max = ExtremeEigenvalues(cfg.eig_dense_max_n)("ntk", ntk).lambda_max
        lr = cfg.lr_fraction * 2.0 / lam_max
    else:
        lr = cfg.lr
    geometry = data.separation
    constants: list[Point] = [
        (catalogue.PARAMETER_COUNT, 0, float(sum(w.numel() for w in net.trained_weights()))),
        (catalogue.RUN_LR, 0, lr),
        (catalogue.C_SIGMA, 0, c_sigma(cfg.activation)),
        (catalogue.DUPLICATE_PAIRS, 0, float(geometry.duplicate_pairs)),
        (catalogue.PARALLEL_PAIRS, 0, float(geometry.parallel_pairs)),
        (catalogue.MAX_ABS_COSINE, 0, geometry.max_abs_cosine),
        (catalogue.MIN_SEPARATION, 0, geometry.min_separation),
        (
            catalogue.SEPARATION_RATIO,
            0,
            allen_zhu_separation_ratio(cfg, geometry.min_separation),
        ),
    ]
    curves: dict[str, LinearizedLossCurve] = {}
    if cfg.theory:
        residual0 = None
        if cfg.loss == "mse" and cfg.num_outputs == 1:
            residual0 = data.y.to(X.device) - fwd.u[:, 0].detach().double()
        more, curves = _theory(cfg, X, data.y, lr, ntk, residual0)
        constants += more
    return Baseline(
        weights=[w.detach().clone() for w in net.trained_weights()],
        patterns=[activation_pattern(z) for z in hidden],
        ntk=ntk,
        last_hidden=last_hidden_gram(cfg, net, grams),
        state={k: v.detach().cpu().clone() for k, v in net.state_dict().items()},
        lr=lr,
        curves=curves,
        constants=constants,
    )


def _theory(
    cfg: RunConfig,
    X: torch.Tensor,
    y: torch.Tensor,
    lr: float,
    ntk0: torch.Tensor,
    residual0: torch.Tensor | None,
) -> tuple[list[Point], dict[str, LinearizedLossCurve]]:
    """Constants and predicted curves; the y-dependent ones for scalar regression only."""
    points: list[Point] = []
    curves: dict[str, LinearizedLossCurve] = {}
    if residual0 is not None:
        empirical = EigenDecomposition.of(ntk0)
        curves[PREDICTED_LOSS_H0] = empirical.loss_curve(residual0)
        points.append((catalogue.H0_RATE, 0, (1 - lr * float(empirical.values[0])) ** 2))
    kernels = infinite_width_kernels(cfg, X)
    if kernels is None:
        return points, curves
    points.append((catalogue.KERNEL_ERROR, 0, kernels.error))
    last = None if kernels.last_hidden is None else EigenDecomposition.of(kernels.last_hidden)
    if last is not None:
        lambda0 = float(last.values[0])  # Du's λ₀: λ_min(H^∞), or λ_min(K⁽ᴴ⁾) for deep nets
        points += [
            (catalogue.LAMBDA0, 0, lambda0),
            (catalogue.ETA_LAMBDA0, 0, lr * lambda0),
            (catalogue.DU_RATE_BOUND, 0, 1 - lr * lambda0 / 2),
        ]
    if kernels.ntk is None:
        return points, curves
    same = kernels.ntk is kernels.last_hidden  # two_layer: H^∞ is both
    full = last if same and last is not None else EigenDecomposition.of(kernels.ntk)
    points += [
        (catalogue.NTK_INF_MIN, 0, float(full.values[0])),
        (catalogue.NTK_INF_MAX, 0, float(full.values[-1])),
    ]
    if cfg.spectrum_steps:
        points += [(spectrum_name("ntk_inf", i), 0, float(v)) for i, v in enumerate(full.values)]
    if residual0 is not None:
        y_Hinv_y = full.quadratic_form_inverse(y)
        points += [
            (catalogue.Y_HINV_Y, 0, y_Hinv_y),
            (catalogue.GENERALIZATION, 0, math.sqrt(2 * y_Hinv_y / len(y))),
        ]
        curves[PREDICTED_LOSS] = full.loss_curve(residual0)
    return points, curves
