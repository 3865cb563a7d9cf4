"""Steps per second of ``worker.train.train`` with every metric on, over a bare torch GD loop.

Both train the same network (same init, data, step size, steps) with full-batch GD:

- bare: ``u = net(X)``, ½‖u − y‖², ``torch.autograd.grad``, ``w -= η g`` — nothing else;
- ours: ``train(cfg)`` with the loss group every step (loss, residual norm, accuracy, gradient
  norm, step time), the Gram group every ``--gram-every`` steps with per-layer Grams, weight
  distances and pattern flips every 10 steps, predicted loss curves every 10 steps, full
  spectra at the first and last step, and the per-run theory (infinite-width kernels) at start.

It prints ours/bare in steps per second for the whole run (set-up included: the baseline
Gram at θ(0), its eigen-decomposition and the kernels) and for the loop alone (from
RunStarted to RunFinished). Target: ≥ 0.8 with the Gram every 50 steps. Best of
``--repeats`` interleaved runs. Example for a GPU:

    python benchmarks/train_bench.py --device cuda --n 4096 --width 16384 --depth 4 --steps 200
"""

from __future__ import annotations

import argparse
import time

import torch

from worker.config import DataConfig, RunConfig
from worker.data import make_dataset
from worker.events import RunFinished, RunStarted
from worker.models import build_network
from worker.train import DTYPES, train


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bare_loop(cfg: RunConfig, device: str) -> float:
    """Seconds for ``cfg.steps`` plain GD steps (network built outside the timing)."""
    dtype = DTYPES[cfg.dtype]
    net = build_network(cfg, dtype).to(device)
    data = make_dataset(cfg)
    X, y = data.X.to(device=device, dtype=dtype), data.y.to(device=device, dtype=dtype)
    weights = net.trained_weights()
    lr = float(cfg.lr)
    _sync(device)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        loss = 0.5 * (net(X)[:, 0] - y).pow(2).sum()
        grads = torch.autograd.grad(loss, weights)
        with torch.no_grad():
            for w, g in zip(weights, grads, strict=True):
                w.add_(g, alpha=-lr)
    _sync(device)
    return time.perf_counter() - start


def our_run(cfg: RunConfig, device: str) -> tuple[float, float]:
    """(whole run, loop alone) in seconds for ``train(cfg)``."""
    start = time.perf_counter()
    loop_start = start
    for event in train(cfg, device=device):
        if isinstance(event, RunStarted):
            loop_start = time.perf_counter()
        if isinstance(event, RunFinished):
            assert event.steps_done == cfg.steps, event
    _sync(device)
    end = time.perf_counter()
    return end - start, end - loop_start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="fc", choices=["two_layer", "fc", "resnet"])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--gram-every", type=int, default=50)
    parser.add_argument("--lr", type=float, default=0.001)
    parser.add_argument("--dtype", default="float64", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = RunConfig(
        arch=args.arch,
        width=args.width,
        depth=1 if args.arch == "two_layer" else args.depth,
        data=DataConfig(n=args.n, d=args.d),
        lr=args.lr,
        steps=args.steps,
        gram_every=args.gram_every,
        gram_per_layer=True,
        weights_every=10,
        theory_every=10,
        spectrum_steps=(0, args.steps),
        dtype=args.dtype,
    )
    print(
        f"device={args.device} arch={cfg.arch} n={args.n} d={args.d} m={args.width} "
        f"H={cfg.depth} steps={args.steps} gram_every={args.gram_every} dtype={args.dtype} "
        f"threads={torch.get_num_threads()} best of {args.repeats} interleaved runs"
    )
    bare, whole, loop = float("inf"), float("inf"), float("inf")
    for _ in range(args.repeats):
        bare = min(bare, bare_loop(cfg, args.device))
        run, run_loop = our_run(cfg, args.device)
        whole, loop = min(whole, run), min(loop, run_loop)
    steps = cfg.steps
    rows = [("bare GD loop", bare), ("train(), whole run", whole), ("train(), loop only", loop)]
    for label, seconds in rows:
        ratio = "" if label.startswith("bare") else f"  ratio {bare / seconds:.3f}"
        print(f"{label:<18}: {steps / seconds:8.2f} steps/s ({seconds:.2f} s){ratio}")


if __name__ == "__main__":
    main()
