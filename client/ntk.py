"""The empirical NTK Gram of any ``nn.Module`` and its extreme eigenvalues (``overparam.ntk``).

For a model f with trainable parameters θ (those with ``requires_grad``; freeze a layer to leave
it out) and inputs x_1…x_n, per output c

    Θ⁽ᶜ⁾_ij = ⟨∂f_c(x_i)/∂θ, ∂f_c(x_j)/∂θ⟩        (Jacot et al. 2018; Du et al. ICML 2019)

and the Gram is their mean (1/C) Σ_c Θ⁽ᶜ⁾ (``outputs="mean"``, the default: the trace average
of the nC×nC NTK, as the service's runs define ``ntk_lambda_min``, docs/metrics.md) or their
sum Σ_c Θ⁽ᶜ⁾ (``outputs="sum"``); for one output both are the NTK itself. An n×n float64
matrix; λ_min of it is what the theory tracks (it stays ≥ λ₀/2 in the lazy regime).

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

torch is imported when a function here is called, never by importing this module: the client
and the CLI stay light, and need torch only for this.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["eigenvalues", "extremes", "gram", "is_layerwise", "lambda_min", "spectrum"]

LAMBDA_MIN = "ntk_lambda_min"  # the service's metric names (worker/metric_names.py)
LAMBDA_MAX = "ntk_lambda_max"
WORKSPACE_BYTES = 1 << 30  # what the Jacobians of one pair of sample chunks may take

Method = Literal["auto", "layerwise", "jacobian"]
Outputs = Literal["mean", "sum"]

# parameter-free modules of torch.nn that act on each coordinate alone: the layer-wise path's
ELEMENTWISE = (
    "ReLU",
    "LeakyReLU",
    "ReLU6",
    "ELU",
    "SELU",
    "CELU",
    "GELU",
    "SiLU",
    "Mish",
    "Tanh",
    "Sigmoid",
    "Softplus",
    "Softsign",
    "Hardtanh",
    "Hardsigmoid",
    "Hardswish",
    "Tanhshrink",
    "Identity",
)


def _torch() -> Any:
    try:
        import torch
    except ModuleNotFoundError as exc:  # the light client: torch is the user's own choice
        raise ModuleNotFoundError(
            "overparam.ntk needs torch: install the build for your machine "
            "(e.g. pip install torch)",
            name="torch",
        ) from exc
    return torch


@contextmanager
def _no_tf32(torch: Any) -> Iterator[None]:
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
    nn = _torch().nn
    if not isinstance(model, nn.Sequential) or X.dim() != 2 or len(model) == 0:
        return False
    elementwise = tuple(getattr(nn, name) for name in ELEMENTWISE)
    for layer in model:
        if isinstance(layer, nn.Linear):
            continue
        if not isinstance(layer, elementwise) or any(True for _ in layer.parameters()):
            return False
    return any(isinstance(layer, nn.Linear) for layer in model)


def gram(
    model: nn.Module,
    X: torch.Tensor,
    *,
    outputs: Outputs = "mean",
    method: Method = "auto",
    chunk_size: int | None = None,
) -> torch.Tensor:
    """The (n, n) float64 empirical NTK Gram of ``model`` at the n samples ``X`` (along the
    first dimension), over its parameters with ``requires_grad``, symmetric, on X's device.

    ``outputs``: how C > 1 outputs combine: ``"mean"`` (1/C) Σ_c J_c J_cᵀ, as the service's
    runs log ``ntk_lambda_min``, or ``"sum"`` Σ_c J_c J_cᵀ (the trace of the nC×nC NTK over
    outputs); the same for one output. ``method``: ``"auto"`` takes the layer-wise path where
    :func:`is_layerwise`, else the ``torch.func`` Jacobian; ``"layerwise"`` refuses
    (ValueError) a model it does not fit. ``chunk_size``: samples per Jacobian chunk (default:
    as many as fit WORKSPACE_BYTES).
    """
    torch = _torch()
    if method not in ("auto", "layerwise", "jacobian"):
        raise ValueError(f"method is auto, layerwise or jacobian, not {method!r}")
    if outputs not in ("mean", "sum"):
        raise ValueError(f"outputs is mean or sum, not {outputs!r}")
    if X.dim() < 1 or X.shape[0] == 0:
        raise ValueError("no inputs: X needs at least one sample along its first dimension")
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError("the model has no parameter that requires a gradient")
    layerwise = is_layerwise(model, X)
    if method == "layerwise" and not layerwise:
        raise ValueError(
            "the layer-wise path needs an nn.Sequential of nn.Linear layers and parameter-free "
            "elementwise activations on an (n, d) input; use method='jacobian'"
        )
    with _no_tf32(torch), torch.enable_grad():  # also when called under torch.no_grad()
        if method == "layerwise" or (method == "auto" and layerwise):
            G, count = _layerwise_gram(torch, model, X)
        else:
            G, count = _jacobian_gram(torch, model, X, chunk_size)
    if outputs == "mean":
        G /= count
    return (G + G.T) / 2


def eigenvalues(
    model: nn.Module, X: torch.Tensor, *, outputs: Outputs = "mean", method: Method = "auto"
) -> torch.Tensor:
    """The n eigenvalues of :func:`gram`, ascending, float64 (``torch.linalg.eigvalsh``)."""
    return _torch().linalg.eigvalsh(gram(model, X, outputs=outputs, method=method))


def extremes(
    model: nn.Module, X: torch.Tensor, *, outputs: Outputs = "mean", method: Method = "auto"
) -> tuple[float, float]:
    """(λ_min, λ_max) of :func:`gram`: what ``ntk_lambda_min`` / ``ntk_lambda_max`` record."""
    values = eigenvalues(model, X, outputs=outputs, method=method)
    return float(values[0]), float(values[-1])


spectrum = eigenvalues


def lambda_min(model: nn.Module, X: torch.Tensor, *, outputs: Outputs = "mean") -> float:
    """The Gram's smallest eigenvalue (Du et al.'s λ_min(H): > 0 when gradient descent fits
    the n inputs at a linear rate near initialization)."""
    return extremes(model, X, outputs=outputs)[0]


def _layerwise_gram(torch: Any, model: nn.Module, X: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(Σ_layers (A Aᵀ) ⊙ (Σ_c B_c B_cᵀ) + Σ_c B_c B_cᵀ for a trained bias, C)."""
    Linear = torch.nn.Linear
    h = X.detach().to(torch.float64).requires_grad_(True)  # a graph through every layer
    inputs: list[torch.Tensor] = []
    signals_at: list[torch.Tensor] = []
    linears: list[Any] = []
    for layer in model.children():  # a Sequential's, in order
        if isinstance(layer, Linear):
            weight = layer.weight.detach().to(torch.float64)
            bias = None if layer.bias is None else layer.bias.detach().to(torch.float64)
            inputs.append(h.detach())
            h = torch.nn.functional.linear(h, weight, bias)
            signals_at.append(h)
            linears.append(layer)
        else:
            h = layer(h)
    n = X.shape[0]
    out = h.reshape(n, -1)
    count = out.shape[1]
    zeros = [torch.zeros(n, n, dtype=torch.float64, device=X.device) for _ in signals_at]
    signal_grams: list[torch.Tensor] = zeros
    for c in range(count):  # one backward per output: samples do not interact
        signals = torch.autograd.grad(
            out[:, c].sum(), signals_at, retain_graph=c + 1 < count, allow_unused=True
        )
        for k, B in enumerate(signals):
            if B is not None:
                signal_grams[k] += B @ B.T
    G = torch.zeros(n, n, dtype=torch.float64, device=X.device)
    for A, BB, layer in zip(inputs, signal_grams, linears, strict=True):
        if layer.weight.requires_grad:
            G += (A @ A.T) * BB
        if layer.bias is not None and layer.bias.requires_grad:
            G += BB
    return G, count


def _jacobian_gram(
    torch: Any, model: nn.Module, X: torch.Tensor, chunk_size: int | None
) -> tuple[torch.Tensor, int]:
    """(Σ_c J_c J_cᵀ by blocks of per-sample Jacobians (``vmap(jacrev)``), C)."""
    from torch.func import functional_call, jacrev, vmap

    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = {name: p.detach().to(torch.float64) for name, p in model.named_parameters()}
    buffers = {
        name: b.detach().to(torch.float64) if b.is_floating_point() else b.detach()
        for name, b in model.named_buffers()
    }
    trained = {name: params[name] for name in names}
    frozen = {name: p for name, p in params.items() if name not in trained} | buffers
    Xd = X.detach().to(torch.float64) if X.is_floating_point() else X.detach()

    def f(theta: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, theta | frozen, (x.unsqueeze(0),)).reshape(-1)

    jacobian: Callable[..., dict[str, torch.Tensor]] = vmap(jacrev(f), in_dims=(None, 0))

    def flat(chunk: torch.Tensor) -> torch.Tensor:  # (samples, outputs, P)
        parts = jacobian(trained, chunk)
        shape = parts[names[0]].shape[:2]
        return torch.cat([parts[name].reshape(*shape, -1) for name in names], dim=2)

    n = X.shape[0]
    count = f(trained, Xd[0]).numel()
    if chunk_size is None:
        size = sum(p.numel() for p in trained.values())
        chunk_size = max(1, WORKSPACE_BYTES // (2 * 8 * count * size))
    G = torch.zeros(n, n, dtype=torch.float64, device=X.device)
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
    return G, count
