"""Training objectives and their residuals, as the theory writes them (sums, not means).

- ``mse``: L = ½ Σ_i ‖u_i − y_i‖² (Du et al.), residual y − u; u (n, C), y (n,) or (n, C).
- ``cross_entropy``: L = Σ_i −log softmax(u_i)_{y_i} with u (n, C) and class indices y; its
  residual, the gradient ∂L/∂u, is softmax(u) − onehot(y).

Summing keeps the step size comparable with the Gram eigenvalues: GD on the linearized model is
stable for η < 2/λ_max(H) whatever n is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from worker.config import Loss
from worker.data import LabelKind


def objective(kind: Loss, u: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The training loss (a scalar tensor with the graph of u): u (n, C), y (n,) or (n, C)."""
    if kind == "mse":
        return 0.5 * (u - y.reshape(u.shape)).pow(2).sum()
    return F.cross_entropy(u, y.long(), reduction="sum")


def residual_norm(kind: Loss, u: torch.Tensor, y: torch.Tensor) -> float:
    """‖y − u‖_F (mse) or ‖softmax(u) − onehot(y)‖_F (cross_entropy)."""
    with torch.no_grad():
        if kind == "mse":
            return float((y.reshape(u.shape) - u).norm())
        onehot = F.one_hot(y.long(), u.shape[1]).to(u.dtype)
        return float((torch.softmax(u, dim=1) - onehot).norm())


def accuracy(label_kind: LabelKind, u: torch.Tensor, y: torch.Tensor) -> float | None:
    """Fraction classified right: argmax for classes, sign(u) for ±1 targets; None for reals."""
    with torch.no_grad():
        if label_kind == "classes":
            return float((u.argmax(dim=1) == y.long()).double().mean())
        if label_kind == "binary":
            return float(((u[:, 0] > 0) == (y > 0)).double().mean())
        return None
