"""Infinite-width kernels: the limits m → ∞ of the empirical Grams at initialization.

- ``two_layer`` (Du et al. ICLR 2019): H^∞ = Σ⁰ ⊙ E[σ'(u)σ'(v)] with Σ⁰ = X Xᵀ; for ReLU and unit
  inputs H^∞_ij = x_iᵀx_j (π − arccos x_iᵀx_j)/(2π).
- ``fc`` (Du et al. ICML 2019; Jacot et al. 2018): Σʰ = c_σ E[σ(u)σ(v)], Σ̇ʰ = c_σ τ² E[σ'σ'],
  (u, v) ~ N(0, τ²Σʰ⁻¹); full NTK Θ = Σᴴ + Σ_h Σʰ⁻¹ ⊙ Π_{h'≥h} Σ̇ʰ'; Du's K⁽ᴴ⁾ = Σᴴ⁻¹ ⊙ Σ̇ᴴ.
- ``resnet`` (Du et al. ICML 2019, Section 5): K⁽¹⁾ = Σ¹, b⁽¹⁾_i = √c_σ E[σ(u_i)]; for h ≥ 2
  K⁽ʰ⁾ = K⁽ʰ⁻¹⁾ + (c_res/H)(b_i μ_j + μ_i b_j) + (c_res/H)² E[σσ], b⁽ʰ⁾ = b⁽ʰ⁻¹⁾ + (c_res/H) μ
  with μ_i = E[σ(u_i)] over N(0, τ²K⁽ʰ⁻¹⁾); the limit of G⁽ᴴ⁾ is
  (c_res/H)² τ² K⁽ᴴ⁻¹⁾ ⊙ E[σ'σ'] (its λ_min scales like c_res²/H²). b is the mean-field term
  (1/√m) Σ_r x⁽ʰ⁾_r, nonzero because E[σ] ≠ 0 for ReLU.

τ = ``init_scale`` (1 in the papers). With C outputs the limit of the trace-averaged Gram is the
same scalar kernel. No closed form is implemented for ``conv_resnet`` nor for the full ResNet
NTK. Expectations over (u, v) ~ N(0, [[a, c], [c, b]]): ReLU in closed form (arc-cosine kernels,
Cho & Saul 2009); smooth activations by Mehler's formula E[f(u)f(v)] = Σ_k ρᵏ f̂_k(a) f̂_k(b),
ρ = c/√(ab), with Hermite coefficients f̂_k by Gauss–Hermite quadrature (error < 1e-12 with
120 terms for softplus, tanh, gelu). Cost O(n²·K) per layer, float64, on X's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from worker.activations import ACTIVATIONS, DERIVATIVES, HERMITE_NODES, Elementwise, c_sigma
from worker.config import Activation, RunConfig

MEHLER_TERMS = 120


@dataclass(frozen=True)
class InfiniteWidthKernels:
    """n×n float64 limits: ``ntk`` of the full NTK (None where not derived: resnet), and
    ``last_hidden``, Du's K⁽ᴴ⁾, of the last hidden layer's Gram G⁽ᴴ⁾."""

    ntk: torch.Tensor | None
    last_hidden: torch.Tensor


def _correlation(cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ρ, diag): ρ_ij = cov_ij / √(cov_ii cov_jj) clamped to [−1, 1]."""
    diag = cov.diagonal().clamp_min(torch.finfo(cov.dtype).tiny)
    rho = cov / torch.sqrt(diag[:, None] * diag[None, :])
    return rho.clamp(-1.0, 1.0), diag


def _hermite_coefficients(f: Elementwise, variances: torch.Tensor) -> torch.Tensor:
    """f̂_k(a_i) = E[f(√a_i g) He_k(g)] / √k!, k < MEHLER_TERMS: (n, K) for g ~ N(0, 1)."""
    nodes, weights = np.polynomial.hermite.hermgauss(HERMITE_NODES)
    g = torch.from_numpy(math.sqrt(2.0) * nodes).to(variances)
    w = torch.from_numpy(weights / math.sqrt(math.pi)).to(variances)
    values = f(torch.sqrt(variances)[:, None] * g) * w  # (n, nodes)
    he_prev, he = torch.ones_like(g), g
    coefficients = [values @ he_prev, values @ he]
    for k in range(1, MEHLER_TERMS - 1):  # normalized recurrence, stable at large |g|
        he_prev, he = he, (g * he - math.sqrt(k) * he_prev) / math.sqrt(k + 1)
        coefficients.append(values @ he)
    return torch.stack(coefficients, dim=1)


def _mehler(f: Elementwise, cov: torch.Tensor) -> torch.Tensor:
    """E[f(u) f(v)] for every pair by Mehler's formula, summed by Horner's rule in ρ."""
    rho, diag = _correlation(cov)
    coeff = _hermite_coefficients(f, diag)
    total = torch.zeros_like(cov)
    for k in range(MEHLER_TERMS - 1, -1, -1):
        total = total * rho + coeff[:, k, None] * coeff[None, :, k]
    return total


def gaussian_moments(
    activation: Activation, cov: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[σ(u)σ(v)], E[σ'(u)σ'(v)]) over (u_i, u_j) ~ N(0, cov[[i, j]][:, [i, j]]): (n, n) each.

    ReLU: √(ab)(√(1−ρ²) + (π − arccos ρ)ρ)/(2π) and (π − arccos ρ)/(2π).
    """
    if activation == "relu":
        rho, diag = _correlation(cov)
        angle = math.pi - torch.arccos(rho)
        scale = torch.sqrt(diag[:, None] * diag[None, :])
        ss = scale * (torch.sqrt((1 - rho * rho).clamp_min(0)) + angle * rho) / (2 * math.pi)
        return ss, angle / (2 * math.pi)
    return _mehler(ACTIVATIONS[activation], cov), _mehler(DERIVATIVES[activation], cov)


def mean_activation(activation: Activation, variances: torch.Tensor) -> torch.Tensor:
    """E[σ(u_i)], u_i ~ N(0, variances_i): (n,). ReLU: √(a/(2π))."""
    if activation == "relu":
        return torch.sqrt(variances / (2 * math.pi))
    return _hermite_coefficients(ACTIVATIONS[activation], variances)[:, 0]


def infinite_width_kernels(cfg: RunConfig, X: torch.Tensor) -> InfiniteWidthKernels | None:
    """The kernels of ``cfg``'s network on inputs X (n, d); None for ``conv_resnet``."""
    if cfg.arch == "conv_resnet":
        return None
    sigma0 = X.double() @ X.double().T
    tau2 = cfg.init_scale**2
    if cfg.arch == "two_layer":
        h_inf = sigma0 * gaussian_moments(cfg.activation, tau2 * sigma0)[1]
        return InfiniteWidthKernels(ntk=h_inf, last_hidden=h_inf)
    if cfg.arch == "fc" or cfg.depth == 1:  # a one-layer resnet is the one-layer fc net
        return _fully_connected(cfg, sigma0, tau2)
    return _resnet(cfg, sigma0, tau2)


def _fully_connected(cfg: RunConfig, sigma0: torch.Tensor, tau2: float) -> InfiniteWidthKernels:
    c = c_sigma(cfg.activation)
    sigmas, dots = [sigma0], [sigma0]  # dots[0] is a placeholder so that dots[h] is Σ̇ʰ
    for _ in range(cfg.depth):
        ss, dd = gaussian_moments(cfg.activation, tau2 * sigmas[-1])
        sigmas.append(c * ss)
        dots.append(c * tau2 * dd)
    ntk, product = sigmas[-1].clone(), torch.ones_like(sigma0)
    for h in range(cfg.depth, 0, -1):
        product = product * dots[h]
        ntk = ntk + sigmas[h - 1] * product
    return InfiniteWidthKernels(ntk=ntk, last_hidden=sigmas[-2] * dots[-1])


def _resnet(cfg: RunConfig, sigma0: torch.Tensor, tau2: float) -> InfiniteWidthKernels:
    c, beta = c_sigma(cfg.activation), cfg.c_res / cfg.depth
    kernel = c * gaussian_moments(cfg.activation, tau2 * sigma0)[0]
    mean_field = math.sqrt(c) * mean_activation(cfg.activation, tau2 * sigma0.diagonal())
    for _ in range(2, cfg.depth):  # K⁽ʰ⁾ for h = 2..H−1
        mu = mean_activation(cfg.activation, tau2 * kernel.diagonal())
        cross = mean_field[:, None] * mu[None, :]
        ss = gaussian_moments(cfg.activation, tau2 * kernel)[0]
        kernel = kernel + beta * (cross + cross.T) + beta**2 * ss
        mean_field = mean_field + beta * mu
    dd = gaussian_moments(cfg.activation, tau2 * kernel)[1]
    return InfiniteWidthKernels(ntk=None, last_hidden=beta**2 * tau2 * kernel * dd)
