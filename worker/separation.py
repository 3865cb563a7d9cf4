"""How far apart the inputs are: the data assumptions of the convergence theorems, numpy only.

One implementation for the run's step-0 report (:mod:`worker.data`) and the dataset upload's
pre-flight report (``services.datasets``), so both use the same threshold and the same numbers.

- Parallel pairs (Du et al. ICLR 2019, Assumption 3.1: no two inputs parallel, a sufficient
  condition): |cos∠(x_i, x_j)| ≥ 1 − ``PARALLEL_TOLERANCE``. Duplicate inputs make λ₀ = 0 for
  every network (and x, αx with α > 0 for ReLU's positively homogeneous ones; with unit inputs
  these are duplicates); antiparallel ones only for odd activations (tanh: f(−x) = −f(x), so
  ∂f(−x)/∂θ = −∂f(x)/∂θ). For ReLU, softplus and gelu they are harmless: the two-layer ReLU
  kernel gives H^∞_ij = x_iᵀx_j (π − arccos x_iᵀx_j)/(2π) = 0 at cos = −1, a positive
  definite 2×2 block.
- Minimum separation (Allen-Zhu, Li & Song ICML 2019, Assumption 2.1): δ = min_{i≠j} ‖x̂_i − x̂_j‖
  over the unit-normalized inputs x̂ = x/‖x‖. √(2 − 2 max|cos|) is only a lower bound of it.

Cost O(n²d) in row blocks of products (O(block · n) memory); δ is recomputed from the
differences of the closest candidate pairs, so it is exact to rounding even when tiny.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

PARALLEL_TOLERANCE = 1e-6  # |cos| ≥ 1 − this counts as (anti)parallel: an angle under ~0.08°
_SLACK = 1e-12  # squared distances this close to a block's least are recomputed exactly
_BLOCK = 1024


@dataclass(frozen=True)
class Separation:
    """Pairs i < j with cos ≥ 1 − tol (``duplicate_pairs``) and |cos| ≥ 1 − tol
    (``parallel_pairs``); ``max_abs_cosine`` over i ≠ j, clamped to [0, 1]; δ
    (``min_separation``) and a pair attaining it (``closest``). NaN and None when n = 1."""

    duplicate_pairs: int
    parallel_pairs: int
    max_abs_cosine: float
    min_separation: float
    closest: tuple[int, int] | None


def unit_rows(X: np.ndarray) -> np.ndarray:
    """X (n, d) with every nonzero row scaled to norm 1 (zero rows stay zero)."""
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms == 0, 1.0, norms)


def cosine_blocks(unit: np.ndarray, block: int = _BLOCK) -> Iterator[tuple[int, np.ndarray]]:
    """(start, cos) for row blocks of the unit rows: cos (rows, n) with the pairs j ≤ i set NaN."""
    n = len(unit)
    for start in range(0, n, block):
        cos = unit[start : start + block] @ unit.T
        rows = np.arange(start, start + len(cos))[:, None]
        cos[np.arange(n)[None, :] <= rows] = np.nan  # each pair i < j once
        yield start, cos


def _closest_in_block(
    unit: np.ndarray, start: int, cos: np.ndarray
) -> tuple[float, tuple[int, int]] | None:
    """The exact least ‖x̂_i − x̂_j‖ among the block's pairs within _SLACK of its least 2 − 2cos."""
    squared = 2.0 - 2.0 * cos
    if np.all(np.isnan(squared)):
        return None
    candidates = np.argwhere(squared <= np.nanmin(squared) + _SLACK)
    rows, cols = candidates[:, 0] + start, candidates[:, 1]
    distances = np.linalg.norm(unit[rows] - unit[cols], axis=1)
    best = int(np.argmin(distances))
    return float(distances[best]), (int(rows[best]), int(cols[best]))


def separation(X: np.ndarray, block: int = _BLOCK) -> Separation:
    """The parallel-pair counts, max |cos| and δ of the rows of X (n, d), float64."""
    unit = unit_rows(np.asarray(X, dtype=np.float64))
    duplicates = parallel = 0
    max_abs, delta, closest = math.nan, math.nan, None
    for start, cos in cosine_blocks(unit, block):
        pairs = cos[~np.isnan(cos)]
        if not pairs.size:
            continue
        duplicates += int((pairs >= 1 - PARALLEL_TOLERANCE).sum())
        parallel += int((np.abs(pairs) >= 1 - PARALLEL_TOLERANCE).sum())
        max_abs = float(np.fmax(max_abs, min(float(np.abs(pairs).max()), 1.0)))
        found = _closest_in_block(unit, start, cos)
        if found is not None and (math.isnan(delta) or found[0] < delta):
            delta, closest = found
    return Separation(duplicates, parallel, max_abs, delta, closest)
