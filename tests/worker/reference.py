"""Independent references, written from the paper formulas rather than from worker code.

- ``paper_forward``: the network output written out from SCIENCE.md for one input, with
  convolutions by ``F.conv1d`` / ``F.conv2d`` (the worker uses explicit patches) and c_σ by
  adaptive quadrature (scipy), so no worker arithmetic is reused.
- ``jacobian_grams``: the per-parameter Grams J_k J_kᵀ with J from torch.func (jacrev + vmap,
  the PyTorch NTK tutorial's method) applied to ``paper_forward``; with C outputs, the mean of
  the C diagonal blocks of the nC×nC NTK. ``jacobian_ntk``: the whole nC×nC J Jᵀ.
"""

from __future__ import annotations

import math
from functools import cache

import torch
import torch.nn.functional as F
from scipy.integrate import quad
from torch.func import jacrev, vmap

from worker.config import RunConfig

SIGMA = {"relu": torch.relu, "softplus": F.softplus, "tanh": torch.tanh, "gelu": F.gelu}


@cache
def reference_c_sigma(activation: str) -> float:
    """1 / E[σ(g)²] by adaptive quadrature against the standard normal density."""
    sigma = SIGMA[activation]

    def integrand(g: float) -> float:
        value = float(sigma(torch.tensor(g, dtype=torch.float64)))
        return value * value * math.exp(-g * g / 2) / math.sqrt(2 * math.pi)

    return 1.0 / quad(integrand, -40, 40, limit=200, points=[0.0])[0]


def _conv(cfg: RunConfig, W: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One convolution of x (c, *spatial) with W (m, c·q), zero padding k//2 → (m, *spatial)."""
    k, c = cfg.kernel_size, x.shape[0]
    if x.dim() == 2:
        return F.conv1d(x[None], W.reshape(W.shape[0], c, k), padding=k // 2)[0]
    return F.conv2d(x[None], W.reshape(W.shape[0], c, k, k), padding=k // 2)[0]


def paper_forward(cfg: RunConfig, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """f(x) ∈ ℝ^C for one input x (d,)."""
    sigma, m, H = SIGMA[cfg.activation], cfg.width, cfg.depth
    scale = math.sqrt(reference_c_sigma(cfg.activation) / m)
    branch = cfg.c_res / (H * math.sqrt(m))
    if cfg.arch == "two_layer":
        return params["a"].T @ sigma(params["W"] @ x) / math.sqrt(m)
    if cfg.parametrization == "standard":  # Allen-Zhu et al.: h₀ = relu(Ax), h_ℓ = relu(W_ℓh)
        h = torch.relu(params["Ws.0"] @ x)
        for k in range(1, H):
            h = torch.relu(params[f"Ws.{k}"] @ h)
        return params["a"].T @ h  # y = B h_L
    if cfg.arch == "conv_resnet":
        data = cfg.data
        spatial = data.image_shape or (data.positions,)
        h = scale * sigma(_conv(cfg, params["Ws.0"], x.reshape(data.channels, *spatial)))
        for k in range(1, H):
            h = h + branch * sigma(_conv(cfg, params[f"Ws.{k}"], h))
        a = params["a"]  # (m, p, C)
        return torch.einsum("rpc,rp->c", a, h.reshape(m, -1))
    h = scale * sigma(params["Ws.0"] @ x)
    for k in range(1, H):
        z = params[f"Ws.{k}"] @ h
        h = scale * sigma(z) if cfg.arch == "fc" else h + branch * sigma(z)
    return params["a"].T @ h


def jacobian_grams(
    cfg: RunConfig, params: dict[str, torch.Tensor], trained: list[str], X: torch.Tensor
) -> dict[str, torch.Tensor]:
    """{name: (1/C) Σ_c J_c Jᵀ_c} for every trained parameter (n×n each)."""
    fixed = {k: v for k, v in params.items() if k not in trained}

    def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return paper_forward(cfg, p | fixed, x)

    jac = vmap(jacrev(f), (None, 0))({k: params[k] for k in trained}, X)
    grams = {}
    for k in trained:
        J = jac[k].reshape(X.shape[0], jac[k].shape[1], -1)  # (n, C, P_k)
        grams[k] = torch.einsum("icp,jcp->ij", J, J) / J.shape[1]
    return grams


def jacobian_ntk(
    cfg: RunConfig, params: dict[str, torch.Tensor], trained: list[str], X: torch.Tensor
) -> torch.Tensor:
    """The nC×nC NTK J Jᵀ over the ``trained`` parameters, rows ordered (output c, input i)."""
    fixed = {k: v for k, v in params.items() if k not in trained}

    def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return paper_forward(cfg, p | fixed, x)

    jac = vmap(jacrev(f), (None, 0))({k: params[k] for k in trained}, X)
    n = X.shape[0]
    J = torch.cat([jac[k].reshape(n, jac[k].shape[1], -1) for k in trained], dim=2)  # (n, C, P)
    J = J.transpose(0, 1).reshape(-1, J.shape[2])  # row c·n + i
    return J @ J.T


def network_params(net: torch.nn.Module) -> tuple[dict[str, torch.Tensor], list[str]]:
    """All parameters and buffers of ``net`` by name, and the names of the trained ones."""
    params = {k: v.detach().clone() for k, v in net.named_parameters()}
    params |= {k: v.detach().clone() for k, v in net.named_buffers()}
    trained = [k for k, v in net.named_parameters() if v.requires_grad]
    return params, trained
