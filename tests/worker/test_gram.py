"""The layer-wise Gram identity against an independent torch.func Jacobian of the paper formulas."""

from __future__ import annotations

import pytest
import torch

import worker.gram
from tests.worker.reference import jacobian_grams, jacobian_ntk, network_params
from worker.config import DataConfig, RunConfig
from worker.data import make_dataset
from worker.gram import conv_gram, grams, layer_grams, no_tf32, ntk_gram
from worker.models import build_network
from worker.spectra import ExtremeEigenvalues

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
    # only some layers trained (train_layers), Allen-Zhu et al.'s parametrization
    RunConfig(arch="fc", width=16, depth=3, train_layers="hidden", data=DataConfig(n=9, d=5)),
    RunConfig(
        arch="fc",
        width=16,
        depth=3,
        train_layers="hidden",
        parametrization="standard",
        data=DataConfig(n=9, d=5),
    ),
    RunConfig(arch="resnet", width=12, depth=3, train_layers="last", data=DataConfig(n=7, d=4)),
    RunConfig(
        arch="conv_resnet",
        width=5,
        depth=3,
        train_layers="hidden",
        activation="tanh",
        data=DataConfig(n=5, d=8),
    ),
]


def _case_id(cfg: RunConfig) -> str:
    trained = f"-{cfg.train_layers}-{cfg.parametrization}" if cfg.train_layers != "all" else ""
    return f"{cfg.arch}-H{cfg.depth}-{cfg.activation}-{cfg.data.kind}-C{cfg.num_outputs}{trained}"


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


ALLEN_ZHU = RunConfig(
    arch="fc",
    width=24,
    depth=4,
    train_layers="hidden",
    parametrization="standard",
    loss="cross_entropy",
    data=DataConfig(kind="digits", n=8, classes=(0, 1, 2)),
    seed=5,
)


def test_allen_zhu_gram_is_the_jacobian_over_the_hidden_layers_only() -> None:
    """Allen-Zhu, Li & Song: h₀ = relu(Ax), h_ℓ = relu(W_ℓh_{ℓ−1}), y = Bh_L with A and B fixed.
    The trained parameters are W₁…W_L (here Ws.1…Ws.3, named from the paper, not read from the
    network), and the NTK is J Jᵀ over them alone."""
    net = build_network(ALLEN_ZHU)
    params, trainable = network_params(net)
    assert trainable == ["Ws.1", "Ws.2", "Ws.3"]
    X = make_dataset(ALLEN_ZHU).X
    reference = jacobian_grams(ALLEN_ZHU, params, ["Ws.1", "Ws.2", "Ws.3"], X)
    ours = layer_grams(net.forward_layers(X))
    assert len(ours) == 3
    for name, gram in zip(["Ws.1", "Ws.2", "Ws.3"], ours, strict=True):
        assert _rel(gram, reference[name]) < 1e-10
    every_layer = jacobian_grams(ALLEN_ZHU, params, [*params], X)  # A and B would add their share
    assert _rel(sum(ours), sum(every_layer.values())) > 1e-3


def test_allen_zhu_initialization_scales() -> None:
    """Entries of A and W_ℓ ~ N(0, 2/m), of B ~ N(0, 1/C) (the paper's d outputs): sample
    variances of one wide draw within 3% (m = 512: ~5·10⁴ samples or more per matrix)."""
    cfg = ALLEN_ZHU.model_copy(update={"width": 512})
    net = build_network(cfg)
    params, _ = network_params(net)
    m, C = cfg.width, cfg.num_outputs
    for name in ("Ws.0", "Ws.1", "Ws.2", "Ws.3"):
        assert float(params[name].var()) == pytest.approx(2 / m, rel=0.03), name
    assert float(params["a"].var()) == pytest.approx(1 / C, rel=0.05)
    ntk = RunConfig(arch="fc", width=512, depth=4, data=DataConfig(kind="digits", classes=(3, 8)))
    ntk_params, _ = network_params(build_network(ntk))
    assert float(ntk_params["Ws.1"].var()) == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize(
    "cfg",
    [
        CASES[10],  # fc, 3 digit classes
        CASES[11],  # two_layer, 2 classes
        CASES[12],  # conv_resnet, 2 classes
        ALLEN_ZHU,
    ],
    ids=_case_id,
)
def test_full_multi_output_ntk_equals_the_explicit_jacobian_product(cfg: RunConfig) -> None:
    """The nC×nC NTK from the layer-wise structure equals J Jᵀ with J (nC × P) from torch.func,
    so do its extreme eigenvalues; its diagonal blocks average to the reported Gram, and its
    least eigenvalue is below the trace average's (the cross blocks are not zero)."""
    data = make_dataset(cfg)
    X = data.X[:12]
    net = build_network(cfg)
    computed = grams(net.forward_layers(X), full_outputs=True)
    assert computed.full is not None
    params, trained = network_params(net)
    explicit = jacobian_ntk(cfg, params, trained, X)
    assert _rel(computed.full, explicit) < 1e-10
    eig = ExtremeEigenvalues(dense_max_n=10_000)
    ours, reference = eig("full", computed.full), torch.linalg.eigvalsh(explicit)
    assert ours.lambda_min == pytest.approx(float(reference[0]), rel=1e-8, abs=1e-12)
    assert ours.lambda_max == pytest.approx(float(reference[-1]), rel=1e-10)
    n, C = X.shape[0], cfg.num_outputs
    blocks = computed.full.reshape(C, n, C, n).diagonal(dim1=0, dim2=2).mean(dim=-1)
    average = torch.stack(computed.layers).sum(0)
    torch.testing.assert_close(blocks, average, rtol=1e-10, atol=1e-12)
    assert ours.lambda_min < float(torch.linalg.eigvalsh(average)[0])
