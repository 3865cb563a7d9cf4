"""What the theory predicts for a run, from a kernel and the targets (regression, C = 1).

- Du et al. (ICLR 2019, ICML 2019): λ₀ = λ_min of the infinite-width kernel (H^∞ for
  ``two_layer``, K⁽ᴴ⁾ for the deep nets); ‖y − u(k)‖² ≤ (1 − ηλ₀/2)ᵏ ‖y − u(0)‖².
- Arora, Du, Hu, Li & Wang (ICML 2019): with H = Σ_i λ_i v_i v_iᵀ, ‖y − u(k)‖ ≈
  √(Σ_i (1 − ηλ_i)^{2k} (v_iᵀ r₀)²); distance from init √(yᵀH⁻¹y); generalization measure
  √(2 yᵀH⁻¹y / n). Arora et al. start from u(0) ≈ 0 (small init), we use r₀ = y − u(0), the
  exact linearized dynamics of our initialization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from worker.spectra import symmetrized


@dataclass(frozen=True)
class LinearizedLossCurve:
    """The GD loss of the model linearized with kernel H, L(k) = ½ Σ_i (1 − ηλ_i)^{2k} p_i².

    eigenvalues: (n,) ascending λ_i of H; projections: (n,) p_i = v_iᵀ r₀. float64, CPU.
    """

    eigenvalues: torch.Tensor
    projections: torch.Tensor

    def loss(self, step: int, lr: float) -> float:
        contraction = (1.0 - lr * self.eigenvalues) ** (2 * step)
        return 0.5 * float((contraction * self.projections**2).sum())


@dataclass(frozen=True)
class EigenDecomposition:
    """H = V diag(λ) Vᵀ of a symmetric kernel: values (n,) ascending, vectors (n, n); float64."""

    values: torch.Tensor
    vectors: torch.Tensor

    @classmethod
    def of(cls, gram: torch.Tensor) -> EigenDecomposition:
        """``eigh`` of ½(H + Hᵀ): O(n³)."""
        values, vectors = torch.linalg.eigh(symmetrized(gram))
        return cls(values, vectors)

    def quadratic_form_inverse(self, y: torch.Tensor) -> float:
        """yᵀH⁻¹y = Σ_i (v_iᵀy)²/λ_i; inf when H is singular to working precision.

        Rounding leaves the eigenvalues of a singular H at ±n·ε·λ_max rather than 0, which
        would give ~10¹⁵ instead of inf; below that tolerance (numpy's ``matrix_rank``'s) H
        counts as singular.
        """
        n, top = len(self.values), float(self.values[-1].abs())
        if float(self.values[0]) <= n * torch.finfo(self.values.dtype).eps * top:
            return math.inf
        coords = self.vectors.T @ y.double().to(self.vectors.device)
        return float((coords**2 / self.values).sum())

    def loss_curve(self, residual0: torch.Tensor) -> LinearizedLossCurve:
        """The linearized GD loss curve from the initial residual r₀ = y − u(0) (n,)."""
        projections = self.vectors.T @ residual0.double().to(self.vectors.device)
        return LinearizedLossCurve(self.values.cpu(), projections.cpu())
