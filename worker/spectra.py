"""Eigenvalues of Gram matrices, in float64 after symmetrization.

λ_min of an ill-conditioned Gram is the quantity of interest (Du et al.: λ_min(H(k)) ≥ λ₀/2), so
every path works in float64 on ½(G + Gᵀ) (``eigvalsh`` reads one triangle only). Up to
``dense_max_n`` the extreme eigenvalues come from ``eigvalsh`` (O(n³), exact). Beyond it,
Lanczos (ARPACK, Lehoucq et al.): λ_max from G directly, λ_min as 1/λ_max(G⁻¹) with G⁻¹ from a
Cholesky factorization (O(n³/3) once, then one O(n²) product per iteration on G's device):
the smallest eigenvalues of a Gram are clustered, and plain Lanczos or LOBPCG on G needs
thousands of iterations there. Each run warm-starts from the previous Ritz vectors; a cold
start uses the constant vector, so results are deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.linalg import LinearOperator, eigsh

LANCZOS_TOL = 1e-10
LANCZOS_VECTORS = 32


@dataclass(frozen=True)
class Spectrum:
    lambda_min: float
    lambda_max: float


def symmetrized(gram: torch.Tensor) -> torch.Tensor:
    """½(G + Gᵀ) in float64."""
    g = gram.double()
    return 0.5 * (g + g.T)


def eigenvalues(gram: torch.Tensor) -> torch.Tensor:
    """The full spectrum, ascending, float64 (n,)."""
    return torch.linalg.eigvalsh(symmetrized(gram))


def _largest(operator: LinearOperator, start: np.ndarray) -> tuple[float, np.ndarray]:
    ncv = min(operator.shape[0], LANCZOS_VECTORS)
    values, vectors = eigsh(operator, k=1, which="LA", v0=start, ncv=ncv, tol=LANCZOS_TOL)
    return float(values[0]), vectors[:, 0]


def _operator(matrix: torch.Tensor) -> LinearOperator:
    def apply(v: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64)).to(matrix.device)
        return (matrix @ x.reshape(matrix.shape[0], -1)).cpu().numpy()

    n = matrix.shape[0]
    return LinearOperator((n, n), matvec=apply, matmat=apply, dtype=np.float64)


class ExtremeEigenvalues:
    """λ_min and λ_max of named Grams, remembering Lanczos start vectors between calls.

    ``state()`` / ``load_state()`` carry the start vectors through a checkpoint, so a resumed
    run computes bitwise the same eigenvalues as an uninterrupted one.
    """

    def __init__(self, dense_max_n: int) -> None:
        self.dense_max_n = dense_max_n
        self._starts: dict[str, np.ndarray] = {}

    def __call__(self, name: str, gram: torch.Tensor) -> Spectrum:
        sym = symmetrized(gram)
        n = sym.shape[0]
        if n <= self.dense_max_n:
            eig = torch.linalg.eigvalsh(sym)
            return Spectrum(lambda_min=float(eig[0]), lambda_max=float(eig[-1]))
        cold = np.full(n, n**-0.5)
        lam_max, self._starts[f"{name}/max"] = _largest(
            _operator(sym), self._starts.get(f"{name}/max", cold)
        )
        factor, info = torch.linalg.cholesky_ex(sym)
        if int(info) != 0:  # not numerically positive definite: λ_min ≤ 0 up to rounding
            return Spectrum(lambda_min=float(torch.linalg.eigvalsh(sym)[0]), lambda_max=lam_max)
        inverse_max, self._starts[f"{name}/min"] = _largest(
            _operator(torch.cholesky_inverse(factor)), self._starts.get(f"{name}/min", cold)
        )
        return Spectrum(lambda_min=1.0 / inverse_max, lambda_max=lam_max)

    def state(self) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(v.copy()) for name, v in self._starts.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        self._starts = {name: v.numpy().copy() for name, v in state.items()}
