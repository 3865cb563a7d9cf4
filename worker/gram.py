"""Empirical NTK Gram matrices by the layer-wise identity (never a Jacobian).

For a trained dense layer z = A Wᵀ the per-example gradient is b_i a_iᵀ with b_i = ∂u_i/∂z_i, so
its Gram block is G⁽ʰ⁾ = (A Aᵀ) ⊙ (B Bᵀ), and the full NTK H = Σ_h G⁽ʰ⁾ (Du et al. ICML 2019,
Jacot et al. 2018). One forward pass gives every A; one backward of Σ_i u_i gives every B, since
samples do not interact (no batch norm); residual skips are inside B. Cost per layer: two n×n
GEMMs with inner dimension fan_in/fan_out, memory O(n·m + n²); nothing of size P is formed.

A convolution shares W over the p positions: the per-example gradient is B_iᵀ Φ_i (Φ_i: the
(p, q·c) patch matrix, B_i: (p, m)), so G_ij = Σ_{s,t} (B_i B_jᵀ)_{st} (Φ_i Φ_jᵀ)_{st}. We take
the cheaper of instantiating the per-example gradients (n·m·q·c floats) and this pairwise form.

With C outputs (cross-entropy) the Gram is the trace average of the nC×nC NTK, the mean of
its C diagonal blocks: H = (1/C) Σ_c J_c J_cᵀ with J_c = ∂u_{·c}/∂θ. It is the NTK itself for
C = 1 and its infinite-width limit is the scalar kernel (the C blocks coincide, the cross blocks
vanish). Concatenating the C backprop signals (each scaled by C^{-½}) gives it in one product.
The full nC×nC NTK Θ_{(c,i),(c',j)} = ⟨∂u_ic/∂θ, ∂u_jc'/∂θ⟩ (what drives the training of the
C outputs at finite width) has the same structure per layer, Θ⁽ˡ⁾ = (1_{C×C} ⊗ A Aᵀ) ⊙ (B̃ B̃ᵀ)
with B̃ the C signals stacked along the examples (row c·n + i): C² times the Gram's cost and
still no Jacobian.

Numerics: products run in float64 with TF32 off, so λ_min of an ill-conditioned Gram survives.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from worker.models import Forward

WORKSPACE_BYTES = 1 << 30  # memory the convolution Gram may use for intermediates


@contextmanager
def no_tf32() -> Iterator[None]:
    """Disable TF32 in CUDA matmuls and cuDNN (PyTorch enables it for cuDNN by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def output_signals(fwd: Forward) -> list[tuple[torch.Tensor, ...]]:
    """∂u_c/∂z per output c and trained layer, one backward of Σ_i u_ic each: [c][layer].

    Shapes: (n, fan_out) dense, (n, p, m) convolution. The graph is kept: the training step
    backpropagates it again.
    """
    return [
        torch.autograd.grad(fwd.u[:, c].sum(), fwd.preacts, retain_graph=True)
        for c in range(fwd.u.shape[1])
    ]


def backprop_signals(per_output: list[tuple[torch.Tensor, ...]]) -> list[torch.Tensor]:
    """B per trained layer, the outputs' signals concatenated along the neurons and scaled by
    C^{-½}, so that B Bᵀ is their mean: (n, C·fan_out) dense, (n, p, C·m) convolution."""
    if len(per_output) == 1:
        return list(per_output[0])
    scale = 1.0 / math.sqrt(len(per_output))
    return [scale * torch.cat(layer, dim=-1) for layer in zip(*per_output, strict=True)]


def dense_gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """(A Aᵀ) ⊙ (B Bᵀ) in float64: A (n, fan_in), B (n, fan_out) → (n, n)."""
    A64, B64 = A.double(), B.double()
    return (A64 @ A64.T) * (B64 @ B64.T)


def conv_gram(phi: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Gram of a convolution in float64: Φ (n, p, s) patches, B (n, p, r) signals → (n, n).

    Per-example form: g_i = B_iᵀΦ_i (r×s), G = g gᵀ; ~n·p·r·s + n²·r·s multiply-adds and n·r·s
    floats. Pairwise form: Σ_{s,t} (B_iB_jᵀ)_{st}(Φ_iΦ_jᵀ)_{st}; ~(n·p)²·(r+s) multiply-adds,
    computed in row blocks within ``WORKSPACE_BYTES``.
    """
    n, p, s = phi.shape
    r = B.shape[2]
    phi64, B64 = phi.double(), B.double()
    per_example_cost = n * p * r * s + n * n * r * s
    pairwise_cost = (n * p) ** 2 * (r + s)
    if per_example_cost <= pairwise_cost and n * r * s * 8 <= WORKSPACE_BYTES:
        g = torch.einsum("npr,nps->nrs", B64, phi64).reshape(n, r * s)
        return g @ g.T
    B_rows, phi_rows = B64.reshape(n * p, r), phi64.reshape(n * p, s)
    block = max(1, WORKSPACE_BYTES // (3 * 8 * p * n * p))
    gram = torch.empty(n, n, dtype=torch.float64, device=phi.device)
    for i in range(0, n, block):
        rows = slice(i * p, min(i + block, n) * p)
        both = (B_rows[rows] @ B_rows.T) * (phi_rows[rows] @ phi_rows.T)
        gram[i : i + block] = both.reshape(-1, p, n, p).sum(dim=(1, 3))
    return gram


def _layer_gram(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    return dense_gram(A, B) if A.dim() == 2 else conv_gram(A, B)


def _stacked_gram(A: torch.Tensor, signals: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """One layer's nC×nC NTK block from its input A and its C output signals (rows c·n + i)."""
    C, stacked = len(signals), torch.cat(signals, dim=0)
    if A.dim() == 2:
        A64, B64 = A.double(), stacked.double()
        return (A64 @ A64.T).repeat(C, C) * (B64 @ B64.T)
    return conv_gram(A.repeat(C, *([1] * (A.dim() - 1))), stacked)


@dataclass(frozen=True)
class Grams:
    """``layers``: G⁽ˡ⁾ per trained layer (n×n, float64; the trace average for C outputs);
    ``full``: the nC×nC NTK, rows c·n + i (float64), when asked for and C > 1, else None."""

    layers: list[torch.Tensor]
    full: torch.Tensor | None


def grams(fwd: Forward, full_outputs: bool = False) -> Grams:
    """The Grams of a forward that still has its graph; ``full_outputs`` adds the nC×nC NTK
    (from the same backward passes)."""
    with no_tf32():
        per_output = output_signals(fwd)
        inputs = [A.detach() for A in fwd.inputs]
        signals = backprop_signals(per_output)
        layers = [_layer_gram(A, B) for A, B in zip(inputs, signals, strict=True)]
        if not full_outputs or len(per_output) == 1:
            return Grams(layers, None)
        by_layer = zip(inputs, zip(*per_output, strict=True), strict=True)
        full = torch.stack([_stacked_gram(A, outs) for A, outs in by_layer]).sum(dim=0)
        return Grams(layers, full)


def layer_grams(fwd: Forward) -> list[torch.Tensor]:
    """G⁽ˡ⁾ (n×n, float64) for every trained layer, from a forward that still has its graph."""
    return grams(fwd).layers


def ntk_gram(fwd: Forward) -> torch.Tensor:
    """The full empirical NTK H = J Jᵀ = Σ_l G⁽ˡ⁾ (n×n, float64)."""
    return torch.stack(layer_grams(fwd)).sum(dim=0)
