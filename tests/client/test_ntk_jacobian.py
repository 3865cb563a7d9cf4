"""overparam.ntk: the layer-wise and torch.func Grams against an explicit per-sample Jacobian.

Compared with ``outputs="sum"`` (Σ_c J_c J_cᵀ); the default mean divides by C. The reference is
written differently on purpose: a Python loop of ``torch.autograd.grad`` over samples and
outputs, each gradient flattened into a row of J (n·C × P), and Θ = Σ_c J_c J_cᵀ.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from overparam import ntk  # noqa: E402
from worker import metric_names  # noqa: E402

RTOL = 1e-8


def reference_gram(model: nn.Module, X: torch.Tensor) -> torch.Tensor:
    """Θ_ij = Σ_c ⟨∂f_c(x_i)/∂θ, ∂f_c(x_j)/∂θ⟩ from explicit rows of the Jacobian."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows: dict[int, list[torch.Tensor]] = {}
    for i in range(X.shape[0]):
        out = model(X[i : i + 1]).reshape(-1)
        for c in range(out.numel()):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            row = torch.cat(
                [
                    (g if g is not None else torch.zeros_like(p)).reshape(-1)
                    for g, p in zip(grads, params, strict=True)
                ]
            )
            rows.setdefault(c, []).append(row)
    n = X.shape[0]
    G = torch.zeros(n, n, dtype=torch.float64)
    for per_output in rows.values():
        J = torch.stack(per_output)
        G += J @ J.T
    return G


def gram(model: nn.Module, X: torch.Tensor, **kwargs: object) -> torch.Tensor:
    return ntk.gram(model, X, outputs="sum", **kwargs)  # type: ignore[arg-type]


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    scale = b.abs().max()
    assert float((a - b).abs().max() / scale) < RTOL, float((a - b).abs().max() / scale)


def mlp(outputs: int = 1) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, outputs)
    ).double()


class Residual(nn.Module):
    """Not a Sequential: a skip connection, a scale parameter and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(4, 10)
        self.hidden = nn.Linear(10, 10, bias=False)
        self.out = nn.Linear(10, 3)
        self.scale = nn.Parameter(torch.tensor(0.7))
        self.register_buffer("shift", torch.linspace(-0.2, 0.2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.inp(x))
        h = h + self.scale * torch.sin(self.hidden(h) + self.shift)
        return self.out(h)


def data(n: int, d: int) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("outputs", [1, 3])
def test_both_paths_equal_the_explicit_jacobian_for_an_mlp(outputs: int) -> None:
    model, X = mlp(outputs), data(9, 5)
    expected = reference_gram(model, X)
    assert ntk.is_layerwise(model, X)
    close(gram(model, X, method="layerwise"), expected)
    close(gram(model, X, method="jacobian"), expected)
    close(gram(model, X, method="jacobian", chunk_size=2), expected)  # blocks of samples
    assert gram(model, X).dtype == torch.float64
    close(ntk.gram(model, X), expected / outputs)  # the default: the mean over outputs


def test_a_custom_module_takes_the_jacobian_path() -> None:
    torch.manual_seed(2)
    model, X = Residual().double(), data(7, 4)
    assert not ntk.is_layerwise(model, X)
    expected = reference_gram(model, X)
    close(gram(model, X), expected)
    close(gram(model, X, chunk_size=3), expected)
    with pytest.raises(ValueError, match="layer-wise"):
        gram(model, X, method="layerwise")


def test_frozen_parameters_are_left_out_on_both_paths() -> None:
    model, X = mlp(2), data(6, 5)
    model[0].weight.requires_grad_(False)
    model[4].bias.requires_grad_(False)
    expected = reference_gram(model, X)
    close(gram(model, X, method="layerwise"), expected)
    close(gram(model, X, method="jacobian"), expected)


def test_a_float32_model_is_evaluated_in_float64_and_left_untouched() -> None:
    model32, X32 = mlp(1).float(), data(8, 5).float()
    # the float32 weights and inputs, exactly, in float64
    expected = reference_gram(copy.deepcopy(model32).double(), X32.double())
    close(gram(model32, X32, method="layerwise"), expected)
    close(gram(model32, X32, method="jacobian"), expected)
    assert all(p.dtype == torch.float32 for p in model32.parameters())


def test_extremes_are_the_gram_eigenvalues() -> None:
    model, X = mlp(1), data(8, 5)
    values = torch.linalg.eigvalsh(reference_gram(model, X))
    lo, hi = ntk.extremes(model, X, outputs="sum")
    assert abs(lo - float(values[0])) <= RTOL * float(values[-1])
    assert abs(hi - float(values[-1])) <= RTOL * float(values[-1])
    assert ntk.eigenvalues(model, X).shape == (8,)


def test_both_paths_work_under_no_grad() -> None:
    model, X = mlp(2), data(6, 5)
    expected = reference_gram(model, X)
    with torch.no_grad():
        close(gram(model, X, method="layerwise"), expected)
        close(gram(model, X, method="jacobian"), expected)


def test_a_model_without_trainable_parameters_is_refused() -> None:
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="requires a gradient"):
        ntk.gram(model, torch.zeros(2, 3))


def test_importing_the_module_does_not_import_torch() -> None:
    code = "import sys, client.ntk, client; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_the_metric_names_are_the_services() -> None:
    assert ntk.LAMBDA_MIN == metric_names.LAMBDA_MIN
    assert ntk.LAMBDA_MAX == metric_names.LAMBDA_MAX
