"""overparam.ntk, the NTK of a user's own torch model, against the service's layer-wise Gram
(worker.gram, itself checked against a Jacobian reference) on the service's own networks, and
against closed forms; importing overparam does not import torch."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

import overparam
from worker.config import DataConfig, RunConfig
from worker.data import make_dataset
from worker.gram import ntk_gram
from worker.models import build_network

CASES = [
    RunConfig(arch="two_layer", width=32, data=DataConfig(n=12, d=5), seed=3),
    RunConfig(arch="fc", width=16, depth=3, data=DataConfig(n=9, d=6), seed=7),
    RunConfig(arch="resnet", width=12, depth=2, activation="gelu", data=DataConfig(n=7, d=3)),
    RunConfig(arch="conv_resnet", width=4, depth=2, kernel_size=3, data=DataConfig(n=6, d=8)),
    # several outputs: the mean of the C diagonal blocks, as the runs log it
    RunConfig(
        arch="fc",
        width=10,
        depth=2,
        loss="cross_entropy",
        data=DataConfig(kind="digits", n=8, classes=(0, 1, 2)),
    ),
    # frozen layers are left out (requires_grad=False)
    RunConfig(arch="fc", width=16, depth=3, train_layers="hidden", data=DataConfig(n=9, d=5)),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.arch}-C{c.num_outputs}-{c.train_layers}")
def test_gram_of_a_module_equals_the_services_gram(cfg: RunConfig) -> None:
    X = make_dataset(cfg).X
    net = build_network(cfg)
    expected = ntk_gram(net.forward_layers(X))
    ours = overparam.ntk.gram(net, X)
    assert ours.dtype == torch.float64 and ours.shape == (X.shape[0], X.shape[0])
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-12)
    values = torch.linalg.eigvalsh(expected)
    assert overparam.ntk.lambda_min(net, X) == pytest.approx(float(values.min()), rel=1e-8)
    torch.testing.assert_close(overparam.ntk.spectrum(net, X), values, rtol=1e-8, atol=1e-12)


def test_linear_model_closed_form() -> None:
    """f(x) = W x + b with C outputs: H = X Xᵀ + 1 for every output, so their mean too."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(6, 4, dtype=torch.float64, generator=gen)
    model = nn.Linear(4, 3).double()
    torch.testing.assert_close(overparam.ntk.gram(model, X), X @ X.T + 1)


def test_a_model_without_trainable_parameters_is_refused() -> None:
    model = nn.Linear(3, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="requires a gradient"):
        overparam.ntk.gram(model, torch.zeros(2, 3))


def test_import_overparam_does_not_import_torch() -> None:
    code = (
        "import sys, overparam; overparam.Client; overparam.ntk.lambda_min; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
