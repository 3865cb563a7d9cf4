"""The CUDA paths: the same Grams, eigenvalues and training on the GPU as on the CPU."""

from __future__ import annotations

import pytest
import torch

from worker.config import DataConfig, RunConfig
from worker.data import make_dataset
from worker.events import MetricBatch
from worker.gram import layer_grams
from worker.metric_names import LOSS
from worker.models import build_network
from worker.spectra import ExtremeEigenvalues
from worker.train import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize("arch", ["two_layer", "fc", "resnet", "conv_resnet"])
def test_grams_on_the_gpu_equal_the_cpu_ones(arch: str) -> None:
    cfg = RunConfig(
        arch=arch, depth=1 if arch == "two_layer" else 3, width=64, data=DataConfig(n=32, d=8)
    )
    X = make_dataset(cfg).X
    cpu = layer_grams(build_network(cfg).forward_layers(X))
    gpu = layer_grams(build_network(cfg).to("cuda").forward_layers(X.to("cuda")))
    for c, g in zip(cpu, gpu, strict=True):
        assert g.device.type == "cuda" and g.dtype == torch.float64
        torch.testing.assert_close(g.cpu(), c, rtol=1e-10, atol=1e-12)


def test_float32_grams_on_the_gpu_are_not_tf32() -> None:
    torch.backends.cuda.matmul.allow_tf32 = True  # as if someone turned it on globally
    try:
        cfg = RunConfig(arch="fc", depth=2, width=256, data=DataConfig(n=64, d=16))
        X = make_dataset(cfg).X
        exact = sum(layer_grams(build_network(cfg).forward_layers(X)))
        net = build_network(cfg, torch.float32).to("cuda")
        single = sum(layer_grams(net.forward_layers(X.float().to("cuda"))))
        assert float((single.cpu() - exact).norm() / exact.norm()) < 1e-5  # TF32 gives ~1e-3
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False


def test_lanczos_on_the_gpu_matches_dense() -> None:
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(400, 50, dtype=torch.float64, generator=gen)
    gram = (A @ A.T + 1e-3 * torch.eye(400, dtype=torch.float64)).to("cuda")
    dense = torch.linalg.eigvalsh(gram.cpu())
    eig = ExtremeEigenvalues(dense_max_n=100)("ntk", gram)
    assert eig.lambda_min == pytest.approx(float(dense[0]), rel=1e-8)
    assert eig.lambda_max == pytest.approx(float(dense[-1]), rel=1e-10)


def test_training_on_the_gpu_follows_the_cpu_run() -> None:
    cfg = RunConfig(
        arch="fc",
        depth=2,
        width=128,
        data=DataConfig(n=16, d=8),
        steps=50,
        lr="auto",
        gram_every=10,
    )

    def losses(device: str) -> dict[int, float]:
        events = train(cfg, device=device)
        return {
            s: v for e in events if isinstance(e, MetricBatch) for n, s, v in e.points if n == LOSS
        }

    cpu, gpu = losses("cpu"), losses("cuda")
    assert gpu.keys() == cpu.keys()
    assert all(gpu[k] == pytest.approx(cpu[k], rel=1e-8) for k in cpu)
