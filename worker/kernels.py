"""Infinite-width kernels: the limits m → ∞ of the empirical Grams at initialization.

- ``two_layer`` (Du et al. ICLR 2019): H^∞ = Σ⁰ ⊙ E[σ'(u)σ'(v)] with Σ⁰ = X Xᵀ; for ReLU and unit
  inputs H^∞_ij = x_iᵀx_j (π − arccos x_iᵀx_j)/(2π).
- ``fc`` (Du et al. ICML 2019; Jacot et al. 2018): Σʰ = c_σ E[σ(u)σ(v)], Σ̇ʰ = c_σ τ² E[σ'σ'],
  (u, v) ~ N(0, τ²Σʰ⁻¹); layer h's share of the NTK is Σʰ⁻¹ ⊙ Π_{h'≥h} Σ̇ʰ' and the output
  layer's is Σᴴ; Du's K⁽ᴴ⁾ = Σᴴ⁻¹ ⊙ Σ̇ᴴ. The NTK sums the shares of the trained layers
  (``train_layers``); Allen-Zhu et al.'s standard parametrization multiplies the hidden shares
  by m/(c_σ C) (:func:`worker.models.layer_gradient_scale`).
- ``resnet`` (Du et al. ICML 2019, Section 5): K⁽¹⁾ = Σ¹, b⁽¹⁾_i = √c_σ E[σ(u_i)]; for h ≥ 2
  K⁽ʰ⁾ = K⁽ʰ⁻¹⁾ + (c_res/H)(b_i μ_j + μ_i b_j) + (c_res/H)² E[σσ], b⁽ʰ⁾ = b⁽ʰ⁻¹⁾ + (c_res/H) μ
  with μ_i = E[σ(u_i)] over N(0, τ²K⁽ʰ⁻¹⁾); the limit of G⁽ᴴ⁾ is
  (c_res/H)² τ² K⁽ᴴ⁻¹⁾ ⊙ E[σ'σ'] (its λ_min scales like c_res²/H²). b is the mean-field term
  (1/√m) Σ_r x⁽ʰ⁾_r, nonzero because E[σ] ≠ 0 for ReLU.

τ = ``init_scale`` (1 in the papers). With C outputs the limit of the trace-averaged Gram is the
same scalar kernel. No closed form is implemented for ``conv_resnet`` nor for the full ResNet
NTK.

**Gaussian expectations at any scale.** Every activation is a Gaussian-smoothed positively
homogeneous function, f(x) = E[h(x + √ν ε)] with ε ~ N(0, 1):

- relu: h = relu, ν = 0 (relu' = step, ν = 0);
- gelu = x Φ(x) = E[relu(x + ε)] − φ(x) (ν = 1), gelu' = E[step(x + ε)] − x φ(x);
- softplus = E[relu(x + 2Kε)], softplus' = sigmoid = E[step(x + 2Kε)];
- tanh = E[sign(x + Kε)], tanh' = 2 E[δ(x + Kε)];

K the Kolmogorov–Smirnov scale of the logistic law (:mod:`worker.logistic_mixture`). Noise added
to u and v independently only adds ν₁, ν₂ to the variances, so over (u, v) ~ N(0, [[a, c],
[c, b]]) each expectation is a closed form of A = a + ν₁, B = b + ν₂, c and D = AB − c² (the
arc-cosine kernels of Cho & Saul 2009 and their δ-function relatives; gelu's is Tsuchida et
al. 2021's), averaged over ν₁, ν₂ for the logistic family by a 12-point Gauss rule per side.
Exact for relu and gelu; for softplus and tanh the rule's error is ~10⁻¹³ of the kernel's
diagonal scale √(K_ii K_jj) for every variance (0 … 10⁸ measured) and correlation, and each
result carries an estimate: its difference from an 8-point rule (~10⁻¹⁰, an overestimate).
The angle is taken as θ = arctan(c/√D) and D = (ab − c²) + aν₂ + bν₁ + ν₁ν₂, so the diagonal
(D from ν alone) and near-parallel pairs lose no digits to cancellation. Cost: O(n²) per
layer for relu and gelu; for the logistic family N(N+1)/2 pair geometries per rule (78 + 36),
each a few n×n operations, float64.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from worker.activations import c_sigma
from worker.config import OUTPUT_LAYER, Activation, RunConfig
from worker.logistic_mixture import scale_rule
from worker.models import layer_gradient_scale

RULE_NODES, CHECK_NODES = 12, 8  # the Gauss rule over K, and the one it is checked against


@dataclass(frozen=True)
class _Pair:
    """Geometry of (u + √ν₁ε₁, v + √ν₂ε₂) for every input pair: all (n, n) but a and b.

    a (n, 1) and b (1, n): the variances of u and v; c: their covariance; A = a + ν₁,
    B = b + ν₂; D = AB − c²; root = √D; theta = arcsin(c/√(AB)) = arctan(c/√D), computed on
    first use (the δ-function forms do not need it).
    """

    a: torch.Tensor
    b: torch.Tensor
    c: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    D: torch.Tensor
    root: torch.Tensor

    @classmethod
    def of(cls, cov: torch.Tensor, det: torch.Tensor, nu1: float, nu2: float) -> _Pair:
        """``det`` = (ab − c²)₊, computed once: the exact 0 of the diagonal is kept."""
        a, b = cov.diagonal()[:, None], cov.diagonal()[None, :]
        D = det + (a * nu2 + nu1 * nu2) + b * nu1
        return cls(a, b, cov, a + nu1, b + nu2, D, D.sqrt())

    @cached_property
    def theta(self) -> torch.Tensor:
        return torch.atan2(self.c, self.root)


ClosedForm = Callable[[_Pair], torch.Tensor]


def _sign_sign(p: _Pair) -> torch.Tensor:
    """E[sign(u′) sign(v′)] = (2/π) arcsin ρ."""
    return (2 / math.pi) * p.theta


def _step_step(p: _Pair) -> torch.Tensor:
    """E[1{u′ > 0} 1{v′ > 0}] = (π − arccos ρ)/(2π)."""
    return 0.25 + p.theta / (2 * math.pi)


def _relu_relu(p: _Pair) -> torch.Tensor:
    """E[relu(u′) relu(v′)] = √(AB)(√(1−ρ²) + (π − arccos ρ)ρ)/(2π) = (√D + c(π/2 + θ))/(2π)."""
    return (p.root + p.c * (math.pi / 2 + p.theta)) / (2 * math.pi)


def _sech2_sech2(p: _Pair) -> torch.Tensor:
    """4 E[δ(u′) δ(v′)]: four times the density of (u′, v′) at 0, 4/(2π√D)."""
    return 2 / (math.pi * p.root)


def _gelu_gelu(p: _Pair) -> torch.Tensor:
    """E[gelu(u) gelu(v)], ν₁ = ν₂ = 1: E[relu relu] − E[relu(u′)δ(v′)] − E[δ(u′)relu(v′)]
    + E[δδ] = (√D + c(π/2+θ))/(2π) − √D/(2πB) − √D/(2πA) + 1/(2π√D), rearranged without
    cancellation (small a) as (c(π/2 + θ) + (abD + c²)/(AB√D))/(2π)."""
    rest = (p.a * p.b * p.D + p.c * p.c) / (p.A * p.B * p.root)
    return (p.c * (math.pi / 2 + p.theta) + rest) / (2 * math.pi)


def _gelu_prime_gelu_prime(p: _Pair) -> torch.Tensor:
    """E[gelu'(u) gelu'(v)], ν₁ = ν₂ = 1, gelu' = E[step(·+ε)] − E[δ'(·+ε)]:
    E[step step] + c/(2πB√D) + c/(2πA√D) + c/(2πD√D)."""
    return _step_step(p) + p.c * (1 / p.A + 1 / p.B + 1 / p.D) / (2 * math.pi * p.root)


@dataclass(frozen=True)
class _Smoothing:
    """σ = E[h(· + √ν ε)]: the law of ν and the closed forms of E[σσ] and E[σ'σ'] given ν₁, ν₂.

    ``variance`` None: ν is K² times ``logistic_scale`` with K Kolmogorov–Smirnov (Gauss rule);
    otherwise the fixed ν (weight 1). ``mean(a, ν)`` is E[σ(u)] at variance a for one ν.
    """

    variance: float | None
    logistic_scale: float
    ss: ClosedForm
    dd: ClosedForm
    mean: Callable[[torch.Tensor, float], torch.Tensor]

    def rule(self, nodes: int) -> list[tuple[float, float]]:
        """[(ν_p, w_p)]: one point for relu and gelu, the N-point Gauss rule for the rest."""
        if self.variance is not None:
            return [(self.variance, 1.0)]
        k2, weights = scale_rule(nodes)
        return [
            (self.logistic_scale * float(v), float(w)) for v, w in zip(k2, weights, strict=True)
        ]


def _relu_mean(a: torch.Tensor, nu: float) -> torch.Tensor:
    """E[relu(u + √ν ε)] = √((a + ν)/(2π))."""
    return torch.sqrt((a + nu) / (2 * math.pi))


def _gelu_mean(a: torch.Tensor, nu: float) -> torch.Tensor:
    """E[gelu(u)] = E[relu(u + ε)] − E[φ(u)] = (√A − 1/√A)/√(2π) = a/√(2πA), A = a + 1."""
    return a / torch.sqrt(2 * math.pi * (a + nu))


SMOOTHINGS: dict[str, _Smoothing] = {
    "relu": _Smoothing(0.0, 0.0, _relu_relu, _step_step, _relu_mean),
    "gelu": _Smoothing(1.0, 0.0, _gelu_gelu, _gelu_prime_gelu_prime, _gelu_mean),
    "softplus": _Smoothing(None, 4.0, _relu_relu, _step_step, _relu_mean),
    "tanh": _Smoothing(None, 1.0, _sign_sign, _sech2_sech2, lambda a, nu: torch.zeros_like(a)),
}


@dataclass(frozen=True)
class GaussianMoments:
    """E[σ(u)σ(v)] (``ss``) and E[σ'(u)σ'(v)] (``dd``), (n, n) float64, and ``error``: the
    largest |difference from the check rule| relative to √(M_ii M_jj) (0 for closed forms)."""

    ss: torch.Tensor
    dd: torch.Tensor
    error: float


def _expectations(
    smoothing: _Smoothing, cov: torch.Tensor, det: torch.Tensor, rule: list[tuple[float, float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[σσ], E[σ'σ']) = Σ_{p,q} w_p w_q form(ν_p, ν_q) for both forms, sharing each pair's
    geometry; form(ν_q, ν_p) = form(ν_p, ν_q)ᵀ, so N(N+1)/2 geometries."""
    ss, dd = torch.zeros_like(cov), torch.zeros_like(cov)
    for p, (nu_p, w_p) in enumerate(rule):
        for nu_q, w_q in rule[p:]:
            pair = _Pair.of(cov, det, nu_p, nu_q)
            for total, form in ((ss, smoothing.ss), (dd, smoothing.dd)):
                term = form(pair)
                total.add_(term, alpha=w_p * w_q)
                if nu_q != nu_p:
                    total.add_(term.T, alpha=w_p * w_q)
    return ss, dd


def _relative_gap(value: torch.Tensor, check: torch.Tensor) -> float:
    """max_ij |value − check|_ij / √(value_ii value_jj)."""
    scale = value.diagonal().abs().clamp_min(torch.finfo(value.dtype).tiny).sqrt()
    return float(((value - check).abs() / (scale[:, None] * scale[None, :])).max())


def gaussian_moments(activation: Activation, cov: torch.Tensor) -> GaussianMoments:
    """The moments over (u_i, u_j) ~ N(0, cov[[i, j]][:, [i, j]]) for every pair: (n, n) each.

    ReLU: √(ab)(√(1−ρ²) + (π − arccos ρ)ρ)/(2π) and (π − arccos ρ)/(2π), ρ = c/√(ab).
    """
    smoothing = SMOOTHINGS[activation]
    cov = cov.double()
    a = cov.diagonal()
    det = (a[:, None] * a[None, :] - cov * cov).clamp_min(0)
    ss, dd = _expectations(smoothing, cov, det, smoothing.rule(RULE_NODES))
    if smoothing.variance is not None:
        return GaussianMoments(ss, dd, 0.0)
    check_ss, check_dd = _expectations(smoothing, cov, det, smoothing.rule(CHECK_NODES))
    error = max(_relative_gap(ss, check_ss), _relative_gap(dd, check_dd))
    return GaussianMoments(ss, dd, error)


def mean_activation(activation: Activation, variances: torch.Tensor) -> torch.Tensor:
    """E[σ(u_i)], u_i ~ N(0, variances_i): (n,). ReLU: √(a/(2π))."""
    smoothing = SMOOTHINGS[activation]
    a = variances.double()
    return sum(
        (w * smoothing.mean(a, nu) for nu, w in smoothing.rule(RULE_NODES)),
        start=torch.zeros_like(a),
    )


@dataclass(frozen=True)
class InfiniteWidthKernels:
    """n×n float64 limits: ``ntk``, the NTK over the trained layers (None where not derived:
    resnet); ``last_hidden``, Du's K⁽ᴴ⁾, the limit of G⁽ᴴ⁾ (None when W⁽ᴴ⁾ is not trained);
    ``error``, the largest error estimate of the Gaussian expectations behind them."""

    ntk: torch.Tensor | None
    last_hidden: torch.Tensor | None
    error: float


def infinite_width_kernels(cfg: RunConfig, X: torch.Tensor) -> InfiniteWidthKernels | None:
    """The kernels of ``cfg``'s network on inputs X (n, d); None for ``conv_resnet``."""
    if cfg.arch == "conv_resnet":
        return None
    sigma0 = X.double() @ X.double().T
    tau2 = cfg.init_scale**2
    if cfg.arch == "two_layer":
        moments = gaussian_moments(cfg.activation, tau2 * sigma0)
        h_inf = sigma0 * moments.dd
        return InfiniteWidthKernels(ntk=h_inf, last_hidden=h_inf, error=moments.error)
    if cfg.arch == "fc" or cfg.depth == 1:  # a one-layer resnet is the one-layer fc net
        return _fully_connected(cfg, sigma0, tau2)
    return _resnet(cfg, sigma0, tau2)


def _fully_connected(cfg: RunConfig, sigma0: torch.Tensor, tau2: float) -> InfiniteWidthKernels:
    c = c_sigma(cfg.activation)
    sigmas, dots = [sigma0], [sigma0]  # dots[0] is a placeholder so that dots[h] is Σ̇ʰ
    error = 0.0
    for _ in range(cfg.depth):
        moments = gaussian_moments(cfg.activation, tau2 * sigmas[-1])
        sigmas.append(c * moments.ss)
        dots.append(c * tau2 * moments.dd)
        error = max(error, moments.error)
    trained = set(cfg.trained_layers)
    ntk = sigmas[-1].clone() if OUTPUT_LAYER in trained else torch.zeros_like(sigma0)
    product = torch.ones_like(sigma0)
    for h in range(cfg.depth, 0, -1):
        product = product * dots[h]
        if f"layer{h}" in trained:
            ntk = ntk + layer_gradient_scale(cfg) * sigmas[h - 1] * product
    last = f"layer{cfg.depth}" in trained
    last_hidden = layer_gradient_scale(cfg) * sigmas[-2] * dots[-1] if last else None
    return InfiniteWidthKernels(ntk=ntk, last_hidden=last_hidden, error=error)


def _resnet(cfg: RunConfig, sigma0: torch.Tensor, tau2: float) -> InfiniteWidthKernels:
    c, beta = c_sigma(cfg.activation), cfg.c_res / cfg.depth
    first = gaussian_moments(cfg.activation, tau2 * sigma0)
    kernel, error = c * first.ss, first.error
    mean_field = math.sqrt(c) * mean_activation(cfg.activation, tau2 * sigma0.diagonal())
    for _ in range(2, cfg.depth):  # K⁽ʰ⁾ for h = 2..H−1
        mu = mean_activation(cfg.activation, tau2 * kernel.diagonal())
        cross = mean_field[:, None] * mu[None, :]
        moments = gaussian_moments(cfg.activation, tau2 * kernel)
        kernel = kernel + beta * (cross + cross.T) + beta**2 * moments.ss
        mean_field = mean_field + beta * mu
        error = max(error, moments.error)
    last = gaussian_moments(cfg.activation, tau2 * kernel)
    trained = f"layer{cfg.depth}" in cfg.trained_layers
    last_hidden = beta**2 * tau2 * kernel * last.dd if trained else None
    return InfiniteWidthKernels(ntk=None, last_hidden=last_hidden, error=max(error, last.error))
