"""The layer-wise Gram identity against an independent torch.func Jacobian of the paper formulas."""

from __future__ import annotations

import pytest
import torch

import worker.gram
from tests.worker.reference import jacobian_grams, network_params
from worker.config import DataConfig, RunConfig
from worker.data import make_dataset
from worker.gram import conv_gram, layer_grams, no_tf32, ntk_gram
from worker.models import build_network

CASES = [
    RunConfig(arch="two_layer", width=32, data=DataConfig(n=12, d=5), seed=3),
    RunConfig(arch="two_layer", width=16, activation="tanh", data=DataConfig(n=8, d=4)),
    RunConfig(arch="fc", width=24, depth=1, data=DataConfig(n=10, d=4), seed=1),
    RunConfig(arch="fc", width=16, depth=3, data=DataConfig(n=9, d=6), seed=7),
    RunConfig(arch="fc", width=12, depth=2, activation="softplus", data=DataConfig(n=8, d=5)),
    RunConfig(arch="resnet", width=16, depth=3, data=DataConfig(n=9, d=6), c_res=0.5),
    RunConfig(arch="resnet", width=12, depth=2, activation="gelu", data=DataConfig(n=7, d=3)),
    RunConfig(
        arch="conv_resnet", width=6, depth=2, kernel_size=3, data=DataConfig(n=6, d=8), seed=2
    ),
    RunConfig(
        arch="conv_resnet",
        width=5,
        depth=3,
        kernel_size=3,
        activation="softplus",
        data=DataConfig(n=5, d=12, channels=2),
    ),
    RunConfig(
        arch="conv_resnet",
        width=4,
        depth=2,
        kernel_size=3,
        data=DataConfig(kind="digits", n=6, classes=(3, 8)),
    ),
    # several outputs: the Gram is the mean of the C diagonal blocks
    RunConfig(
        arch="fc",
        width=10,
        depth=2,
        loss="cross_entropy",
        data=DataConfig(kind="digits", n=8, classes=(0, 1, 2)),
    ),
    RunConfig(arch="two_layer", width=16, loss="cross_entropy", data=DataConfig(labels="sign")),
    RunConfig(
        arch="conv_resnet",
        width=4,
        depth=2,
        loss="cross_entropy",
        data=DataConfig(n=5, d=6, labels="teacher"),
    ),
]


def _case_id(cfg: RunConfig) -> str:
    return f"{cfg.arch}-H{cfg.depth}-{cfg.activation}-{cfg.data.kind}-C{cfg.num_outputs}"


def _reference(cfg: RunConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    data = make_dataset(cfg)
    X = data.X[:12]
    net = build_network(cfg)
    ours = layer_grams(net.forward_layers(X))
    params, trained = network_params(net)
    reference = jacobian_grams(cfg, params, trained, X)
    name_of = {id(p): name for name, p in net.named_parameters()}
    return ours, [reference[name_of[id(w)]] for w in net.trained_weights()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cfg", CASES, ids=_case_id)
def test_every_layer_gram_and_the_ntk_equal_the_jacobian_reference(cfg: RunConfig) -> None:
    ours, reference = _reference(cfg)
    assert len(ours) == len(reference)
    for layer, (g, r) in enumerate(zip(ours, reference, strict=True)):
        assert g.dtype == torch.float64
        assert _rel(g, r) < 1e-8, f"layer {layer}: relative error {_rel(g, r):.2e}"
    assert _rel(sum(ours), sum(reference)) < 1e-8


def test_conv_gram_pairwise_form_equals_per_example_form(monkeypatch: pytest.MonkeyPatch) -> None:
    gen = torch.Generator().manual_seed(0)
    phi = torch.randn(7, 5, 6, dtype=torch.float64, generator=gen)
    B = torch.randn(7, 5, 4, dtype=torch.float64, generator=gen)
    per_example = conv_gram(phi, B)
    monkeypatch.setattr(worker.gram, "WORKSPACE_BYTES", 3 * 8 * 5 * 7 * 5 * 2)  # blocks of 2 rows
    pairwise = conv_gram(phi, B)
    expected = torch.einsum("nps,npr,qts,qtr->nq", phi, B, phi, B)
    torch.testing.assert_close(per_example, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(pairwise, expected, rtol=1e-12, atol=1e-12)


def test_two_layer_gram_matches_closed_form() -> None:
    """H_ij = (1/m) x_iᵀx_j Σ_r 1{w_rᵀx_i ≥ 0, w_rᵀx_j ≥ 0} (Du et al. ICLR 2019)."""
    cfg = CASES[0]
    data = make_dataset(cfg)
    net = build_network(cfg)
    S = (data.X @ net.W.detach().T > 0).double()
    closed = (data.X @ data.X.T) * (S @ S.T) / cfg.width
    torch.testing.assert_close(ntk_gram(net.forward_layers(data.X)), closed, rtol=1e-12, atol=1e-12)


def test_fc_layer_grams_sum_to_ntk_and_count_layers() -> None:
    cfg = CASES[3]
    data = make_dataset(cfg)
    fwd = build_network(cfg).forward_layers(data.X)
    grams = layer_grams(fwd)
    assert len(grams) == cfg.depth + 1  # W⁽¹⁾…W⁽ᴴ⁾ and a
    torch.testing.assert_close(sum(grams), ntk_gram(fwd))


def test_no_tf32_turns_tf32_off_and_restores_the_flags() -> None:
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        with no_tf32():
            assert not torch.backends.cuda.matmul.allow_tf32
            assert not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_float32_network_gets_a_float64_gram_close_to_the_float64_one() -> None:
    cfg = CASES[3]
    data = make_dataset(cfg)
    exact = ntk_gram(build_network(cfg, torch.float64).forward_layers(data.X))
    single = ntk_gram(build_network(cfg, torch.float32).forward_layers(data.X.float()))
    assert single.dtype == torch.float64
    assert _rel(single, exact) < 1e-5
