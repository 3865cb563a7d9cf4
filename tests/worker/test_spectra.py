"""Eigenvalues: the dense path, the Lanczos path for large n, warm starts through a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from worker.spectra import ExtremeEigenvalues, eigenvalues, symmetrized


def _relu_gram(n: int, seed: int = 0) -> torch.Tensor:
    """A two-layer ReLU NTK: PSD with clustered small eigenvalues, the hard case."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 10, dtype=torch.float64, generator=gen)
    X = X / X.norm(dim=1, keepdim=True)
    S = (X @ torch.randn(10, 512, dtype=torch.float64, generator=gen) > 0).double()
    return (X @ X.T) * (S @ S.T) / 512


def test_dense_extremes_match_numpy_on_the_symmetrized_matrix() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(20, 20, dtype=torch.float64, generator=gen)
    gram = A @ A.T + 1e-3 * torch.randn(20, 20, dtype=torch.float64, generator=gen)  # asymmetric
    eig = ExtremeEigenvalues(dense_max_n=100)("g", gram)
    expected = np.linalg.eigvalsh(symmetrized(gram).numpy())
    assert eig.lambda_min == pytest.approx(expected[0], rel=1e-10, abs=1e-12)
    assert eig.lambda_max == pytest.approx(expected[-1], rel=1e-10)
    np.testing.assert_allclose(eigenvalues(gram).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_lanczos_path_matches_dense_eigenvalues() -> None:
    gram = _relu_gram(300)
    dense = torch.linalg.eigvalsh(gram)
    eig = ExtremeEigenvalues(dense_max_n=100)("ntk", gram)
    assert eig.lambda_min == pytest.approx(float(dense[0]), rel=1e-8)
    assert eig.lambda_max == pytest.approx(float(dense[-1]), rel=1e-10)


def test_lanczos_warm_start_survives_a_state_round_trip() -> None:
    first, second = _relu_gram(250, seed=1), _relu_gram(250, seed=1) * 1.01
    solver = ExtremeEigenvalues(dense_max_n=10)
    solver("ntk", first)
    restored = ExtremeEigenvalues(dense_max_n=10)
    restored.load_state(solver.state())
    assert restored("ntk", second) == solver("ntk", second)


def test_singular_gram_falls_back_to_dense_lambda_min() -> None:
    gram = _relu_gram(120)
    gram[:, 0] = gram[:, 1]
    gram[0, :] = gram[1, :]  # a duplicated input: λ_min = 0
    eig = ExtremeEigenvalues(dense_max_n=10)("ntk", gram)
    assert abs(eig.lambda_min) < 1e-10 * eig.lambda_max
