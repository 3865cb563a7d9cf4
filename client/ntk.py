"""The empirical NTK of your own torch model, on your machine: its Gram matrix on n inputs and
its smallest eigenvalue, the quantity the service's runs log as ``ntk_lambda_min``.

    import overparam
    lam = overparam.ntk.lambda_min(model, X)   # model: any torch.nn.Module, X: (n, …)

H_ij = ⟨∂f(x_i)/∂θ, ∂f(x_j)/∂θ⟩ over the parameters that require a gradient (freeze a layer to
leave it out). With C outputs (f(x) of shape (C,)) it is the trace average of the nC×nC NTK,
(1/C) Σ_c J_c J_cᵀ, as the service's runs define it (docs/metrics.md). Products and
eigenvalues are float64 with TF32 off, so λ_min of an ill-conditioned Gram survives.

It differentiates each example and output separately (n·C backward passes, the n×P Jacobian
of one output in memory at a time): meant for the n of a Gram, a few hundred inputs, and any
architecture. The model is called on one example at a time (a batch of 1), so call
``model.eval()`` first if it has batch norm or dropout.

torch is imported when a function here is called, never by ``import overparam``: the client
alone does not need it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["gram", "lambda_min", "spectrum"]


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


def gram(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The n×n empirical NTK Gram of ``model`` on ``inputs`` (n examples along dim 0), float64,
    symmetric, on the inputs' device."""
    torch = _torch()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no parameter that requires a gradient")
    n = inputs.shape[0]
    if n == 0:
        raise ValueError("no inputs: the Gram of 0 examples is empty")
    with _no_tf32(torch):
        outputs = [model(inputs[i : i + 1]).reshape(-1) for i in range(n)]
        C = outputs[0].numel()
        if any(out.numel() != C for out in outputs):
            raise ValueError("every example must give the same number of outputs")
        H = torch.zeros(n, n, dtype=torch.float64, device=inputs.device)
        for c in range(C):
            J = torch.stack([_gradient(torch, out[c], params) for out in outputs])
            H += J @ J.T
    H /= C
    return (H + H.T) / 2


def _gradient(torch: Any, value: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """∂value/∂θ flattened over ``params`` (zeros for a parameter it does not depend on)."""
    grads = torch.autograd.grad(value, params, retain_graph=True, allow_unused=True)
    return torch.cat(
        [
            torch.zeros(p.numel(), dtype=torch.float64, device=p.device)
            if g is None
            else g.reshape(-1).double()
            for g, p in zip(grads, params, strict=True)
        ]
    )


def spectrum(model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The Gram's eigenvalues, ascending (float64)."""
    torch = _torch()
    return torch.linalg.eigvalsh(gram(model, inputs))


def lambda_min(model: torch.nn.Module, inputs: torch.Tensor) -> float:
    """The Gram's smallest eigenvalue (Du et al.'s λ_min(H); > 0 when the n inputs are fitted
    at a linear rate by gradient flow near initialization)."""
    return float(spectrum(model, inputs)[0])
