"""Ordinary least squares of a straight line, with the slope's Student-t confidence interval.

Every fit of the analysis is this one: the late-phase convergence rate (log loss against step)
and the scaling laws (log y against log x). With n points, residual variance
s² = Σ rᵢ² / (n − 2), the slope's standard error is √(s² / Σ (xᵢ − x̄)²) and its interval is
slope ± t_{(1+c)/2, n−2} · stderr. Tests check it against ``numpy.linalg.lstsq``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

CONFIDENCE = 0.95


@dataclass(frozen=True)
class LinearFit:
    """y ≈ intercept + slope · x over ``n`` points; stderr and the interval need n ≥ 3."""

    slope: float
    intercept: float
    stderr: float | None
    ci_low: float | None
    ci_high: float | None
    r2: float
    n: int
    confidence: float

    def as_dict(self) -> dict[str, Any]:
        return {
            "slope": self.slope,
            "intercept": self.intercept,
            "stderr": self.stderr,
            "ci": None if self.ci_low is None else [self.ci_low, self.ci_high],
            "r2": self.r2,
            "n_points": self.n,
            "confidence": self.confidence,
        }


def fit_line(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
) -> LinearFit | None:
    """OLS of y on x over the pairs where both are finite; None below 2 points or constant x."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = np.isfinite(xs) & np.isfinite(ys)
    xs, ys = xs[keep], ys[keep]
    n = len(xs)
    if n < 2:
        return None
    dx = xs - xs.mean()
    sxx = float(dx @ dx)
    if sxx <= 0 or sxx < 1e-24 * max(1.0, float(xs @ xs)):
        return None
    slope = float(dx @ (ys - ys.mean())) / sxx
    intercept = float(ys.mean()) - slope * float(xs.mean())
    residual = ys - (intercept + slope * xs)
    ss_res = float(residual @ residual)
    dy = ys - ys.mean()
    ss_tot = float(dy @ dy)
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
    if n < 3:
        return LinearFit(slope, intercept, None, None, None, r2, n, confidence)
    stderr = math.sqrt(ss_res / (n - 2) / sxx)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 2)) * stderr
    return LinearFit(slope, intercept, stderr, slope - half, slope + half, r2, n, confidence)


def fit_power_law(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    confidence: float = CONFIDENCE,
) -> LinearFit | None:
    """y ≈ C · x^slope: OLS of log y on log x over the pairs with x > 0 and y > 0."""
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    keep = (xs > 0) & (ys > 0) & np.isfinite(xs) & np.isfinite(ys)
    return fit_line(np.log(xs[keep]), np.log(ys[keep]), confidence)
