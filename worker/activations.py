"""Activations σ and c_σ = 1 / E_{g~N(0,1)}[σ(g)²] (Du et al. ICML 2019).

c_σ normalizes the fully connected and residual networks so that a unit-norm input keeps unit
norm layer after layer at initialization (2 for ReLU). The Gaussian expectations of σ and σ' at
other variances are closed forms in :mod:`worker.kernels`.
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


HERMITE_NODES = 200


@cache
def c_sigma(name: Activation) -> float:
    """c_σ: 2 exactly for ReLU; Gauss–Hermite quadrature (200 nodes) for smooth activations.

    E[σ(g)²] = π^{-1/2} Σ_i w_i σ(√2 t_i)² for the Hermite nodes t_i and weights w_i: at unit
    variance σ(√2 t) is analytic in a strip of half-width ≥ π/(2√2) (tanh's poles), where 200
    nodes leave an error near 10⁻¹⁴.
    """
    if name == "relu":
        return 2.0
    nodes, weights = np.polynomial.hermite.hermgauss(HERMITE_NODES)
    values = ACTIVATIONS[name](torch.from_numpy(math.sqrt(2.0) * nodes)).numpy()
    second_moment = float(np.sum(weights * values**2) / math.sqrt(math.pi))
    return 1.0 / second_moment
