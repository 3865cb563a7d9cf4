"""The empirical NTK Gram of any ``nn.Module`` and its extreme eigenvalues (``overparam.ntk``).

For a model f with trainable parameters θ (those with ``requires_grad``) and inputs x_1…x_n,

    Θ_ij = Σ_c ⟨∂f_c(x_i)/∂θ, ∂f_c(x_j)/∂θ⟩        (Jacot et al. 2018; Du et al. ICML 2019)

an n×n float64 matrix. With several outputs c the Gram is **summed** over them (the trace of the
nC×nC NTK over its C diagonal blocks, not their mean as the service's worker reports for
cross-entropy runs); for one output it is the NTK itself. λ_min(Θ) is the quantity the
over-parameterization theory tracks (``ntk_lambda_min``: it stays ≥ λ₀/2 in the lazy regime).

Two ways to compute it, the same matrix:

- ``"layerwise"``, for an ``nn.Sequential`` of ``nn.Linear`` layers and parameter-free
  elementwise activations: per layer (A Aᵀ) ⊙ (B Bᵀ), A the layer's inputs with a ones column
  for the bias, B = ∂f_c/∂z the backpropagated signals at its output (one backward per output:
  samples do not interact). Two n×n products per layer; nothing of size P is formed.
- ``"jacobian"``, for any module: per-sample Jacobians by ``torch.func`` (``functional_call`` +
  ``vmap(jacrev)``, the PyTorch NTK tutorial's method) in chunks of samples, so that at most two
  chunks' Jacobians (chunk × outputs × P floats each) are held at once.

Both run in float64 with TF32 off (a float32 model's parameters are upcast, the model itself is
untouched), so λ_min of an ill-conditioned Gram survives. Samples must not interact: no batch
norm in training mode; dropout should be off (``model.eval()``).

This module imports torch; nothing else in the client does (``import overparam`` stays light).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, jacrev, vmap

LAMBDA_MIN = "ntk_lambda_min"  # the service's metric names (worker/metric_names.py)
LAMBDA_MAX = "ntk_lambda_max"
WORKSPACE_BYTES = 1 << 30  # what the Jacobians of one pair of sample chunks may take

Method = Literal["auto", "layerwise", "jacobian"]

# parameter-free modules that act on each coordinate alone: the layer-wise path's activations
ELEMENTWISE = (
    nn.ReLU,
    nn.LeakyReLU,
    nn.ReLU6,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Tanh,
    nn.Sigmoid,
    nn.Softplus,
    nn.Softsign,
    nn.Hardtanh,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Tanhshrink,
    nn.Identity,
)


@contextmanager
def _no_tf32() -> Iterator[None]:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def is_layerwise(model: nn.Module, X: torch.Tensor) -> bool:
    """Whether ``model`` fits the layer-wise path: an ``nn.Sequential`` of ``nn.Linear`` and
    parameter-free elementwise activations, applied to an (n, d) batch."""
    if not isinstance(model, nn.Sequential) or X.dim() != 2 or len(model) == 0:
        return False
    for layer in model:
        if isinstance(layer, nn.Linear):
            continue
        if not isinstance(layer, ELEMENTWISE) or any(True for _ in layer.parameters()):
            return False
    return any(isinstance(layer, nn.Linear) for layer in model)


def gram(
    model: nn.Module,
    X: torch.Tensor,
    *,
    method: Method = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The (n, n) float64 empirical NTK Gram Θ of ``model`` at the n samples ``X`` (first
    dimension), summed over the model's outputs, over its parameters with ``requires_grad``.

    ``method``: ``"auto"`` takes the layer-wise path where :func:`is_layerwise`, else the
    ``torch.func`` Jacobian; ``"layerwise"`` refuses (ValueError) a model it does not fit.
    ``chunk_size``: samples per Jacobian chunk (default: as many as fit WORKSPACE_BYTES).
    """
    if method not in ("auto", "layerwise", "jacobian"):
        raise ValueError(f"method is auto, layerwise or jacobian, not {method!r}")
    if X.dim() < 1 or X.shape[0] == 0:
        raise ValueError("X needs at least one sample along its first dimension")
    layerwise = is_layerwise(model, X)
    if method == "layerwise" and not layerwise:
        raise ValueError(
            "the layer-wise path needs an nn.Sequential of nn.Linear layers and parameter-free "
            "elementwise activations on an (n, d) input; use method='jacobian'"
        )
    with _no_tf32():
        if method == "layerwise" or (method == "auto" and layerwise):
            assert isinstance(model, nn.Sequential)
            return _layerwise_gram(model, X)
        return _jacobian_gram(model, X, chunk_size)


def eigenvalues(model: nn.Module, X: torch.Tensor, *, method: Method = "auto") -> torch.Tensor:
    """The n eigenvalues of :func:`gram`, ascending, float64 (``eigvalsh`` of the symmetrized
    Gram)."""
    G = gram(model, X, method=method)
    return torch.linalg.eigvalsh((G + G.T) / 2)


def extremes(model: nn.Module, X: torch.Tensor, *, method: Method = "auto") -> tuple[float, float]:
    """(λ_min, λ_max) of :func:`gram`: what ``ntk_lambda_min`` / ``ntk_lambda_max`` record."""
    values = eigenvalues(model, X, method=method)
    return float(values[0]), float(values[-1])


def _layerwise_gram(model: nn.Sequential, X: torch.Tensor) -> torch.Tensor:
    """Σ_layers (A Aᵀ) ⊙ (Σ_c B_c B_cᵀ), plus Σ_c B_c B_cᵀ for a trained bias."""
    device = X.device
    a = X.detach().to(device=device, dtype=torch.float64).requires_grad_(True)
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    linears: list[nn.Linear] = []
    h = a
    for layer in model:
        if isinstance(layer, nn.Linear):
            weight = layer.weight.detach().to(torch.float64)
            bias = None if layer.bias is None else layer.bias.detach().to(torch.float64)
            inputs.append(h.detach())
            h = nn.functional.linear(h, weight, bias)
            outputs.append(h)
            linears.append(layer)
        else:
            h = layer(h)
    n = X.shape[0]
    out = h.reshape(n, -1)
    signal_grams = [torch.zeros(n, n, dtype=torch.float64, device=device) for _ in outputs]
    for c in range(out.shape[1]):
        signals = torch.autograd.grad(
            out[:, c].sum(), outputs, retain_graph=c + 1 < out.shape[1], allow_unused=True
        )
        for k, B in enumerate(signals):
            if B is not None:
                signal_grams[k] += B @ B.T
    G = torch.zeros(n, n, dtype=torch.float64, device=device)
    for A, BB, layer in zip(inputs, signal_grams, linears, strict=True):
        if layer.weight.requires_grad:
            G += (A @ A.T) * BB
        if layer.bias is not None and layer.bias.requires_grad:
            G += BB
    return G


def _jacobian_gram(model: nn.Module, X: torch.Tensor, chunk_size: int | None) -> torch.Tensor:
    """Σ_names Σ_c J_c Jᵀ_c by blocks of per-sample Jacobians (``vmap(jacrev)``)."""
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach().to(torch.float64) for name, p in model.named_parameters()}
    buffers = {
        name: b.detach().to(torch.float64) if b.is_floating_point() else b.detach()
        for name, b in model.named_buffers()
    }
    trained = {name: params[name] for name in names}
    frozen = {name: p for name, p in params.items() if name not in trained} | buffers
    Xd = X.detach().to(torch.float64) if X.is_floating_point() else X.detach()
    n = X.shape[0]
    G = torch.zeros(n, n, dtype=torch.float64, device=X.device)
    if not trained:
        return G

    def f(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, theta | frozen, (x.unsqueeze(0),)).reshape(-1)

    jacobian: Callable[..., dict[str, torch.Tensor]] = vmap(jacrev(f), in_dims=(None, 0))

    def flat(chunk: torch.Tensor) -> torch.Tensor:  # (c, outputs, P)
        parts = jacobian(trained, chunk)
        shape = parts[names[0]].shape[:2]
        return torch.cat([parts[name].reshape(*shape, -1) for name in names], dim=2)

    if chunk_size is None:
        outputs = f(trained, Xd[0]).numel()
        size = sum(p.numel() for p in trained.values())
        chunk_size = max(1, WORKSPACE_BYTES // (2 * 8 * outputs * size))
    starts = range(0, n, chunk_size)
    for i in starts:
        Ji = flat(Xd[i : i + chunk_size])
        for j in starts:
            if j < i:
                continue
            Jj = Ji if j == i else flat(Xd[j : j + chunk_size])
            block = torch.einsum("iop,jop->ij", Ji, Jj)
            G[i : i + chunk_size, j : j + chunk_size] = block
            G[j : j + chunk_size, i : i + chunk_size] = block.T
    return G
