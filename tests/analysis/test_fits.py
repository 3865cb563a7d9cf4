"""The OLS line and its Student-t interval against numpy's least squares and a textbook
covariance, on fixed seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from services.fits import fit_line, fit_power_law


def lstsq_reference(x: np.ndarray, y: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """slope, intercept, stderr and interval from lstsq and σ² (AᵀA)⁻¹."""
    design = np.column_stack([x, np.ones_like(x)])
    (slope, intercept), residual, _, _ = np.linalg.lstsq(design, y, rcond=None)
    sigma2 = float(residual[0]) / (len(x) - 2)
    stderr = math.sqrt(sigma2 * np.linalg.inv(design.T @ design)[0, 0])
    half = stats.t.ppf(0.5 + confidence / 2, len(x) - 2) * stderr
    return {"slope": slope, "intercept": intercept, "stderr": stderr, "half": half}


@pytest.mark.parametrize("n", [3, 7, 40])
def test_fit_line_matches_lstsq(n: int) -> None:
    rng = np.random.default_rng(n)
    x = rng.uniform(0, 10, n)
    y = 1.5 - 0.7 * x + rng.normal(0, 0.3, n)
    fit = fit_line(x, y)
    ref = lstsq_reference(x, y)
    assert fit is not None and fit.n == n
    assert fit.slope == pytest.approx(ref["slope"], rel=1e-10)
    assert fit.intercept == pytest.approx(ref["intercept"], rel=1e-10)
    assert fit.stderr == pytest.approx(ref["stderr"], rel=1e-8)
    assert fit.ci_low == pytest.approx(ref["slope"] - ref["half"], rel=1e-8)
    assert fit.ci_high == pytest.approx(ref["slope"] + ref["half"], rel=1e-8)
    assert 0 <= fit.r2 <= 1


def test_an_exact_line_has_zero_error_and_r2_one() -> None:
    fit = fit_line([1, 2, 3, 4], [3, 5, 7, 9])
    assert fit is not None
    assert (fit.slope, fit.intercept, fit.r2) == pytest.approx((2, 1, 1))
    assert fit.stderr == pytest.approx(0, abs=1e-12) and fit.ci_low == pytest.approx(2)


def test_too_few_points_or_constant_x() -> None:
    assert fit_line([1.0], [2.0]) is None
    assert fit_line([2, 2, 2], [1, 2, 3]) is None
    two = fit_line([1, 2], [1, 3])
    assert two is not None and two.slope == pytest.approx(2) and two.ci_low is None
    assert fit_line([1, 2, math.nan, 4], [1, 2, 3, math.inf]) is not None  # 2 finite pairs


def test_power_law_recovers_its_exponent_and_drops_nonpositive_points() -> None:
    widths = np.array([64, 128, 256, 512, 1024, 4096.0])
    fit = fit_power_law(np.append(widths, 0), np.append(3 * widths**-0.5, 1.0))
    assert fit is not None and fit.n == len(widths)
    assert fit.slope == pytest.approx(-0.5) and math.exp(fit.intercept) == pytest.approx(3)
    assert fit.as_dict()["ci"] == pytest.approx([-0.5, -0.5])
