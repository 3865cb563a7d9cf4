"""Infinite-width kernels: the Gaussian expectations against quadrature, and wide finite
networks converging to the closed forms as the width grows (error ~ m^-½)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.integrate import dblquad

from tests.worker.reference import SIGMA, reference_c_sigma
from worker.activations import DERIVATIVES, c_sigma
from worker.config import DataConfig, RunConfig
from worker.data import make_dataset
from worker.gram import layer_grams
from worker.kernels import gaussian_moments, infinite_width_kernels, mean_activation
from worker.models import build_network


def test_c_sigma_of_relu_is_two() -> None:
    assert c_sigma("relu") == 2.0


@pytest.mark.parametrize("activation", ["softplus", "tanh", "gelu"])
def test_c_sigma_of_smooth_activations_matches_adaptive_quadrature(activation: str) -> None:
    assert c_sigma(activation) == pytest.approx(reference_c_sigma(activation), rel=1e-9)


def _expectation_2d(f, g, a: float, b: float, c: float) -> float:  # type: ignore[no-untyped-def]
    """E[f(u) g(v)] for (u, v) ~ N(0, [[a, c], [c, b]]) by adaptive 2-D quadrature."""
    rho = c / math.sqrt(a * b)

    def integrand(t2: float, t1: float) -> float:
        u = math.sqrt(a) * t1
        v = math.sqrt(b) * (rho * t1 + math.sqrt(1 - rho * rho) * t2)
        density = math.exp(-(t1 * t1 + t2 * t2) / 2) / (2 * math.pi)
        return f(u) * g(v) * density

    return dblquad(integrand, -10, 10, -10, 10, epsabs=1e-10, epsrel=1e-9)[0]


def test_relu_moments_match_monte_carlo() -> None:
    """The arc-cosine closed forms (the kink defeats adaptive quadrature): 4·10⁶ samples."""
    a, b, c = 0.7, 1.3, -0.4
    cov = torch.tensor([[a, c], [c, b]], dtype=torch.float64)
    ss, dd = gaussian_moments("relu", cov)
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(4_000_000, 2, dtype=torch.float64, generator=gen)
    uv = g @ torch.linalg.cholesky(cov).T
    u, v = uv[:, 0], uv[:, 1]
    assert float(ss[0, 1]) == pytest.approx(float((u.relu() * v.relu()).mean()), abs=1e-3)
    assert float(dd[0, 1]) == pytest.approx(float(((u > 0) & (v > 0)).double().mean()), abs=1e-3)
    assert float(ss[0, 0]) == pytest.approx(a / 2, rel=1e-12)  # E[relu(u)²] = a/2
    assert float(mean_activation("relu", cov.diagonal())[0]) == pytest.approx(
        float(u.relu().mean()), abs=1e-3
    )


@pytest.mark.parametrize("activation", ["softplus", "tanh", "gelu"])
def test_smooth_moments_match_two_dimensional_quadrature(activation: str) -> None:
    cov = torch.tensor([[0.7, -0.4], [-0.4, 1.3]], dtype=torch.float64)
    ss, dd = gaussian_moments(activation, cov)  # type: ignore[arg-type]

    def scalar(fn):  # type: ignore[no-untyped-def]
        return lambda t: float(fn(torch.tensor(t, dtype=torch.float64)))

    sigma, dsigma = scalar(SIGMA[activation]), scalar(DERIVATIVES[activation])
    a, b, c = 0.7, 1.3, -0.4
    assert float(ss[0, 1]) == pytest.approx(_expectation_2d(sigma, sigma, a, b, c), abs=1e-7)
    assert float(dd[0, 1]) == pytest.approx(_expectation_2d(dsigma, dsigma, a, b, c), abs=1e-7)
    mu = float(mean_activation(activation, torch.tensor([a], dtype=torch.float64))[0])  # type: ignore[arg-type]
    g = np.linspace(-12, 12, 200001)
    values = SIGMA[activation](torch.from_numpy(math.sqrt(a) * g)).numpy()
    expected = np.trapezoid(values * np.exp(-g * g / 2) / math.sqrt(2 * math.pi), g)
    assert mu == pytest.approx(expected, abs=1e-8)


def test_two_layer_relu_kernel_is_dus_closed_form() -> None:
    cfg = RunConfig(data=DataConfig(n=10, d=5))
    X = make_dataset(cfg).X
    dots = (X @ X.T).clamp(-1, 1)
    closed = dots * (math.pi - torch.arccos(dots)) / (2 * math.pi)
    kernels = infinite_width_kernels(cfg, X)
    assert kernels is not None and kernels.ntk is not None
    torch.testing.assert_close(kernels.ntk, closed, rtol=1e-12, atol=1e-12)


def test_conv_resnet_has_no_closed_form() -> None:
    cfg = RunConfig(arch="conv_resnet", data=DataConfig(n=4, d=6))
    assert infinite_width_kernels(cfg, make_dataset(cfg).X) is None


def _finite_width_errors(cfg: RunConfig, seeds: int) -> tuple[float, float | None]:
    """Mean relative errors of G⁽ᴴ⁾ and of the NTK against their limits, over seeds."""
    last, full = [], []
    for seed in range(seeds):
        run = cfg.model_copy(update={"seed": seed})
        X = make_dataset(run).X
        grams = layer_grams(build_network(run).forward_layers(X))
        kernels = infinite_width_kernels(run, X)
        assert kernels is not None
        G = grams[run.depth - 1]
        last.append(float((G - kernels.last_hidden).norm() / kernels.last_hidden.norm()))
        if kernels.ntk is not None:
            H = sum(grams)
            full.append(float((H - kernels.ntk).norm() / kernels.ntk.norm()))
    return float(np.mean(last)), float(np.mean(full)) if full else None


WIDE = [
    ("two_layer", 1, "relu", 64, 16384),
    ("two_layer", 1, "tanh", 64, 16384),
    ("fc", 2, "relu", 32, 2048),
    ("fc", 3, "softplus", 32, 1024),
    ("resnet", 3, "relu", 32, 2048),
    ("resnet", 2, "gelu", 32, 2048),
]


@pytest.mark.parametrize(("arch", "depth", "activation", "narrow", "wide"), WIDE)
def test_wide_networks_approach_the_infinite_width_kernels(
    arch: str, depth: int, activation: str, narrow: int, wide: int
) -> None:
    """The error shrinks like m^-½: by ~√(wide/narrow); we ask for half of that."""
    base = RunConfig.model_validate(
        {
            "arch": arch,
            "depth": depth,
            "activation": activation,
            "c_res": 0.5,
            "data": {"n": 10, "d": 5},
        }
    )
    small = _finite_width_errors(base.model_copy(update={"width": narrow}), seeds=4)
    large = _finite_width_errors(base.model_copy(update={"width": wide}), seeds=4)
    shrink = 0.5 * math.sqrt(wide / narrow)
    assert large[0] < small[0] / shrink, (small, large)
    if small[1] is not None and large[1] is not None:
        assert large[1] < small[1] / shrink, (small, large)
    assert large[0] < 0.1
