"""Activations σ, their derivatives σ', and c_σ = 1 / E_{g~N(0,1)}[σ(g)²] (Du et al. ICML 2019).

c_σ normalizes the fully connected and residual networks so that a unit-norm input keeps unit
norm layer after layer at initialization (2 for ReLU). The derivatives feed the infinite-width
kernels (:mod:`worker.kernels`), which need E[σ'(u)σ'(v)].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import numpy as np
import torch
import torch.nn.functional as F

from worker.config import Activation

Elementwise = Callable[[torch.Tensor], torch.Tensor]

ACTIVATIONS: dict[str, Elementwise] = {
    "relu": torch.relu,
    "softplus": F.softplus,
    "tanh": torch.tanh,
    "gelu": F.gelu,
}


def _gelu_derivative(x: torch.Tensor) -> torch.Tensor:
    """d/dx [x Φ(x)] = Φ(x) + x φ(x) (the exact, erf-based GELU that ``F.gelu`` computes)."""
    cdf = 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))
    pdf = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
    return cdf + x * pdf


DERIVATIVES: dict[str, Elementwise] = {
    "relu": lambda x: (x > 0).to(x.dtype),
    "softplus": torch.sigmoid,
    "tanh": lambda x: 1.0 - torch.tanh(x) ** 2,
    "gelu": _gelu_derivative,
}

HERMITE_NODES = 200


@cache
def c_sigma(name: Activation) -> float:
    """c_σ: 2 exactly for ReLU; Gauss–Hermite quadrature (200 nodes) for smooth activations.

    E[σ(g)²] = π^{-1/2} Σ_i w_i σ(√2 t_i)² for the Hermite nodes t_i and weights w_i.
    """
    if name == "relu":
        return 2.0
    nodes, weights = np.polynomial.hermite.hermgauss(HERMITE_NODES)
    values = ACTIVATIONS[name](torch.from_numpy(math.sqrt(2.0) * nodes)).numpy()
    second_moment = float(np.sum(weights * values**2) / math.sqrt(math.pi))
    return 1.0 / second_moment
