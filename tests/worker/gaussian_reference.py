"""An independent reference for Gaussian expectations E[f(u) g(v)], (u, v) ~ N(0, [[a, c], [c, b]]).

Written differently from :mod:`worker.kernels` (closed forms over a scale mixture): the
activations and their derivatives in plain ``math``, and adaptive quadrature (QUADPACK through
``scipy.integrate.quad``) of the conditional form

  E[f(u) g(v)] = ∫ f(x) φ_a(x) E[g(v) | u = x] dx,  v | u = x ~ N(cx/a, b − c²/a),

in the variables' own units, with breakpoints where the activations bend (|x| ≲ 8), so that a
large variance (a kink 1/√a wide in standardized units) and a small one are both resolved.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

from scipy.integrate import IntegrationWarning, quad

Scalar = Callable[[float], float]
_SQRT2 = math.sqrt(2.0)
_BENDS = (-8.0, -2.0, -0.5, 0.0, 0.5, 2.0, 8.0)  # where the activations change shape
_WIDTH = 12.0  # Gaussian tails beyond 12 standard deviations: e^{-72}


def _phi_cdf(x: float) -> float:
    return 0.5 * math.erfc(-x / _SQRT2)


def _softplus(x: float) -> float:
    return max(x, 0.0) + math.log1p(math.exp(-abs(x)))


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


FUNCTIONS: dict[str, tuple[Scalar, Scalar]] = {
    "tanh": (math.tanh, lambda x: 1.0 / math.cosh(x) ** 2 if abs(x) < 350 else 0.0),
    "softplus": (_softplus, _sigmoid),
    "gelu": (
        lambda x: x * _phi_cdf(x),
        lambda x: _phi_cdf(x) + x * math.exp(-x * x / 2) / math.sqrt(2 * math.pi),
    ),
}


def _integral(fn: Scalar, lo: float, hi: float, scale: float) -> float:
    points = [p for p in _BENDS if lo < p < hi]
    with warnings.catch_warnings():  # asking for 1e-13 draws roundoff notices; tests compare
        warnings.simplefilter("ignore", IntegrationWarning)
        value, _ = quad(
            fn, lo, hi, points=points or None, limit=400, epsabs=1e-15 * scale, epsrel=1e-13
        )
    return float(value)


def _normal_expectation(f: Scalar, mean: float, sd: float, scale: float) -> float:
    """E[f(mean + sd·ε)] by quadrature over the variable itself."""
    if sd == 0:
        return f(mean)

    def weighted(y: float) -> float:
        t = (y - mean) / sd
        return f(y) * math.exp(-t * t / 2) / (sd * math.sqrt(2 * math.pi))

    return _integral(weighted, mean - _WIDTH * sd, mean + _WIDTH * sd, scale)


def expectation(f: Scalar, g: Scalar, a: float, b: float, c: float, scale: float = 1.0) -> float:
    """E[f(u) g(v)]; ``scale`` is the size of the answer, for the absolute tolerance."""
    sd_u = math.sqrt(a)
    residual = max(b - c * c / a, 0.0)
    if residual <= 1e-14 * b:  # perfectly correlated: v = (c/a) u
        return _normal_expectation(lambda x: f(x) * g(c / a * x), 0.0, sd_u, scale)
    sd_v = math.sqrt(residual)

    def outer(x: float) -> float:
        return f(x) * _normal_expectation(g, c / a * x, sd_v, scale)

    return _normal_expectation(outer, 0.0, sd_u, scale)


def mean(f: Scalar, a: float) -> float:
    """E[f(u)], u ~ N(0, a)."""
    return _normal_expectation(f, 0.0, math.sqrt(a), 1.0)
