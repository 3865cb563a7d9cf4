"""The networks of the papers, in their exact parametrizations (``../shared/SCIENCE.md``).

- ``two_layer`` (Du, Zhai, Póczos & Singh, ICLR 2019): f(x) = m^{-1/2} Σ_r a_r σ(w_rᵀx), a_r ∈ {±1}
  fixed, only W (m×d) trained.
- ``fc`` (Du, Lee, Li, Wang & Zhai, ICML 2019): x⁽ʰ⁾ = √(c_σ/m) σ(W⁽ʰ⁾x⁽ʰ⁻¹⁾), f = aᵀx⁽ᴴ⁾.
- ``resnet`` (same paper): x⁽¹⁾ as in ``fc``, x⁽ʰ⁾ = x⁽ʰ⁻¹⁾ + c_res/(H√m) σ(W⁽ʰ⁾x⁽ʰ⁻¹⁾) for h ≥ 2.
- ``conv_resnet`` (same paper): ``resnet`` with W⁽ʰ⁾ (m × q·c) applied to every zero-padded patch
  of q neighbouring positions (1-D signals or 2-D images); f = ⟨a, x⁽ᴴ⁾⟩, a ∈ ℝ^{m×p}.

Rows of every weight are neurons (channels): W⁽ʰ⁾ is (m, fan_in) and a is (m, C) or (m, p, C),
so per-neuron distances are row norms. Weights start N(0, τ²), τ = ``init_scale`` (1 in the
papers); with C outputs (cross-entropy) a has C columns. ``train_layers`` chooses which of them
GD trains; the others are fixed at their initialization (``requires_grad`` off, still in the
state_dict): ``hidden`` is Allen-Zhu, Li & Song's (ICML 2019) setting, the input layer A = W⁽¹⁾
and the output layer B = a fixed. Their ``standard`` parametrization (fc, ReLU) drops the
√(c_σ/m) layer scale and draws W⁽ʰ⁾ ~ N(0, c_σ τ²/m) (their N(0, 2/m)) and a ~ N(0, τ²/C) (their
N(0, 1/d) for d outputs): for ReLU the same function as ``ntk`` from the same draw, up to u/√C,
with the hidden layers' gradients √(m/(c_σ C)) times larger. Every network returns, besides u,
the (input, pre-activation) pair of each trained linear map: all that the layer-wise Gram
identity in :mod:`worker.gram` needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from worker.activations import ACTIVATIONS, c_sigma
from worker.config import OUTPUT_LAYER, RunConfig


@dataclass(frozen=True)
class Forward:
    """The forward pass of n inputs, with the autograd graph when it was built with one.

    u: (n, C) outputs. For trained layer l: inputs[l] is (n, fan_in) for a dense layer or the
    patch tensor (n, p, q·c_in) for a convolution; preacts[l] is (n, fan_out) or (n, p, m).
    """

    u: torch.Tensor
    inputs: list[torch.Tensor]
    preacts: list[torch.Tensor]


def layer_gradient_scale(cfg: RunConfig) -> float:
    """How much larger a hidden layer's Gram is than under ``ntk``: m/(c_σ C) for Allen-Zhu et
    al.'s ``standard`` parametrization (W = √(c_σ/m) W_ntk and u = u_ntk/√C), 1 otherwise."""
    if cfg.parametrization == "ntk":
        return 1.0
    return cfg.width / (c_sigma(cfg.activation) * cfg.num_outputs)


def _named_layers(Ws: nn.ParameterList, a: nn.Parameter) -> list[tuple[str, nn.Parameter]]:
    """[(layer1, W⁽¹⁾), …, (layerH, W⁽ᴴ⁾), (out, a)]: every weight in forward order."""
    return [*((f"layer{h}", W) for h, W in enumerate(Ws, start=1)), (OUTPUT_LAYER, a)]


def _freeze_untrained(cfg: RunConfig, named: list[tuple[str, nn.Parameter]]) -> list[str]:
    """Turn off the gradients of the weights ``cfg`` does not train; the trained names."""
    trained = set(cfg.trained_layers)
    for name, weight in named:
        weight.requires_grad_(name in trained)
    return [name for name, _ in named if name in trained]


def _normal(
    shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype, scale: float
) -> nn.Parameter:
    """A trained weight, N(0, scale²), drawn in float64 so every dtype starts from one draw."""
    return nn.Parameter((scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(dtype))


class TwoLayer(nn.Module):
    a: torch.Tensor  # fixed ±1 output weights (m, C), a buffer

    def __init__(self, cfg: RunConfig, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        m, d = cfg.width, cfg.data.d
        self.sigma = ACTIVATIONS[cfg.activation]
        self.W = _normal((m, d), gen, dtype, cfg.init_scale)
        signs = torch.randint(0, 2, (m, cfg.num_outputs), generator=gen).to(dtype) * 2 - 1
        self.register_buffer("a", signs)
        self.scale = 1.0 / math.sqrt(m)
        self.layer_names = ["layer1"]

    def trained_weights(self) -> list[nn.Parameter]:
        return [self.W]

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """u (n, C); what ``torch.func.functional_call`` differentiates."""
        return self.forward_layers(X).u

    def forward_layers(self, X: torch.Tensor) -> Forward:
        z = X @ self.W.T
        u = self.scale * (self.sigma(z) @ self.a)
        return Forward(u=u, inputs=[X], preacts=[z])


class FullyConnected(nn.Module):
    """``fc`` and ``resnet`` (``residual``): they differ only in layers 2..H."""

    def __init__(
        self, cfg: RunConfig, gen: torch.Generator, dtype: torch.dtype, residual: bool
    ) -> None:
        super().__init__()
        m, d, H, C = cfg.width, cfg.data.d, cfg.depth, cfg.num_outputs
        self.sigma = ACTIVATIONS[cfg.activation]
        c = c_sigma(cfg.activation)
        standard = cfg.parametrization == "standard"
        self.scale = 1.0 if standard else math.sqrt(c / m)
        self.branch = cfg.c_res / (H * math.sqrt(m)) if residual else None
        fan_ins = [d] + [m] * (H - 1)
        hidden_std = cfg.init_scale * (math.sqrt(c / m) if standard else 1.0)
        self.Ws = nn.ParameterList(_normal((m, f), gen, dtype, hidden_std) for f in fan_ins)
        self.a = _normal((m, C), gen, dtype, cfg.init_scale / (math.sqrt(C) if standard else 1.0))
        self.all_layers = _named_layers(self.Ws, self.a)
        self.layer_names = _freeze_untrained(cfg, self.all_layers)

    def trained_weights(self) -> list[nn.Parameter]:
        return [w for _, w in self.all_layers if w.requires_grad]

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """u (n, C); what ``torch.func.functional_call`` differentiates."""
        return self.forward_layers(X).u

    def forward_layers(self, X: torch.Tensor) -> Forward:
        inputs, preacts = [], []
        x = X
        for h, W in enumerate(self.Ws):
            z = x @ W.T
            if W.requires_grad:
                inputs.append(x)
                preacts.append(z)
            if h == 0 or self.branch is None:
                x = self.scale * self.sigma(z)
            else:
                x = x + self.branch * self.sigma(z)
        out = x @ self.a  # the output layer is the linear map a, with z = u
        if self.a.requires_grad:
            inputs.append(x)
            preacts.append(out)
        return Forward(u=out, inputs=inputs, preacts=preacts)


def patches(x: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Zero-padded patches: x (n, c, p) or (n, c, h, w) → Φ (n, p, c·q), q = k or k².

    Feature order (channel, row, column) matches W.view(m, c, k) / W.view(m, c, k, k), so
    Φ Wᵀ is ``F.conv1d`` / ``F.conv2d`` with ``padding=k//2``.
    """
    k, pad = kernel_size, kernel_size // 2
    if x.dim() == 3:
        cols = F.unfold(x.unsqueeze(2), (1, k), padding=(0, pad))
    else:
        cols = F.unfold(x, (k, k), padding=(pad, pad))
    return cols.transpose(1, 2)


class ConvResNet(nn.Module):
    def __init__(self, cfg: RunConfig, gen: torch.Generator, dtype: torch.dtype) -> None:
        super().__init__()
        m, H, data = cfg.width, cfg.depth, cfg.data
        self.sigma = ACTIVATIONS[cfg.activation]
        self.scale = math.sqrt(c_sigma(cfg.activation) / m)
        self.branch = cfg.c_res / (H * math.sqrt(m))
        self.kernel_size = cfg.kernel_size
        self.spatial = tuple(data.image_shape) if data.image_shape else (data.positions,)
        self.channels = data.channels
        q = cfg.patch_size
        fan_ins = [q * data.channels] + [q * m] * (H - 1)
        self.Ws = nn.ParameterList(_normal((m, f), gen, dtype, cfg.init_scale) for f in fan_ins)
        self.a = _normal((m, data.positions, cfg.num_outputs), gen, dtype, cfg.init_scale)
        self.all_layers = _named_layers(self.Ws, self.a)
        self.layer_names = _freeze_untrained(cfg, self.all_layers)

    def trained_weights(self) -> list[nn.Parameter]:
        return [w for _, w in self.all_layers if w.requires_grad]

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        """u (n, C); what ``torch.func.functional_call`` differentiates."""
        return self.forward_layers(X).u

    def forward_layers(self, X: torch.Tensor) -> Forward:
        n = X.shape[0]
        inputs, preacts = [], []

        def conv(x: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
            """x (n, c, *spatial) → pre-activations (n, p, m), recording a trained layer."""
            phi = patches(x, self.kernel_size)
            z = phi @ W.T
            if W.requires_grad:
                inputs.append(phi)
                preacts.append(z)
            return z

        def channels_first(h: torch.Tensor) -> torch.Tensor:
            return h.transpose(1, 2).reshape(n, -1, *self.spatial)

        first, *rest = self.Ws
        h = self.scale * self.sigma(conv(X.reshape(n, self.channels, *self.spatial), first))
        for W in rest:
            h = h + self.branch * self.sigma(conv(channels_first(h), W))
        flat = channels_first(h).reshape(n, -1)  # (n, m·p), channel-major like a.view(m·p, C)
        out = flat @ self.a.reshape(flat.shape[1], -1)
        if self.a.requires_grad:
            inputs.append(flat)
            preacts.append(out)
        return Forward(u=out, inputs=inputs, preacts=preacts)


Network = TwoLayer | FullyConnected | ConvResNet


def build_network(cfg: RunConfig, dtype: torch.dtype = torch.float64) -> Network:
    """Initialize the network of ``cfg`` from ``cfg.seed``."""
    gen = torch.Generator().manual_seed(cfg.seed)
    if cfg.arch == "two_layer":
        return TwoLayer(cfg, gen, dtype)
    if cfg.arch == "conv_resnet":
        return ConvResNet(cfg, gen, dtype)
    return FullyConnected(cfg, gen, dtype, residual=cfg.arch == "resnet")
