"""Our layer-wise NTK Gram against the torch.func Jacobian method, and against its GEMM floor.

For each width it times, on the same network and inputs:

- ours: ``layer_grams(fwd)`` on the forward pass the training step computes anyway — one
  backward of Σu for the signals B and, per layer, (A Aᵀ) ⊙ (B Bᵀ) in float64 (SCIENCE.md,
  "Computing them fast"); also shown with the forward pass included (``ours+fwd``);
- reference: J = vmap(jacrev(f)) over the trained weights, then H = Σ J Jᵀ (the PyTorch NTK
  tutorial's method, "Jacobian contraction" in Novak et al. 2022). J has n·P entries: past
  ``--ref-max-gib`` the reference is skipped with its estimate (on CUDA an out-of-memory error
  is caught and reported instead);
- floor: only the GEMMs ours cannot avoid, on random tensors of the same shapes: the backward
  of the signals (B W per layer) and A Aᵀ, B Bᵀ per layer (the forward's GEMMs are added for
  the ``+fwd`` column).

It prints reference/ours (target ≥ 100 on fc, n = 256, m = 1024, H = 3, CPU) and ours/floor
(target ≤ 2). Best times over interleaved rounds (see ``best_times``). Example for a GPU:

    python benchmarks/gram_bench.py --device cuda --n 4096 --widths 16384 --depth 4
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
from torch.func import functional_call, jacrev, vmap

from worker.config import DataConfig, RunConfig
from worker.data import make_dataset
from worker.gram import layer_grams, no_tf32
from worker.models import Network, build_network

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def best_times(
    fns: dict[str, Callable[[], object]], device: str, rounds: int, warmup: bool = True
) -> dict[str, float]:
    """Best wall time of each function, in seconds, calling them round-robin ``rounds`` times.

    The minimum, not the median, and interleaved: on a shared machine load comes in bursts,
    and this gives every contender the same chance of a quiet moment.
    """
    for fn in fns.values() if warmup else ():  # allocator, thread pool, lazy initialization
        fn()
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def jacobian_ntk(net: Network, X: torch.Tensor) -> torch.Tensor:
    """H = Σ_weights J Jᵀ with J = vmap(jacrev(f))(θ, X): the torch.func NTK method."""
    names = {id(p): name for name, p in net.named_parameters()}
    trained = {names[id(w)]: w.detach() for w in net.trained_weights()}

    def f(params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(net, params, (x[None],), strict=False)[0, 0]

    jac = vmap(jacrev(f), (None, 0))(trained, X)
    n = X.shape[0]
    with no_tf32():
        flat = [J.reshape(n, -1) for J in jac.values()]
        return torch.stack([J @ J.T for J in flat]).sum(dim=0)


def gemm_floor(net: Network, X: torch.Tensor, forward: bool) -> Callable[[], None]:
    """The bare GEMMs of our Gram, on random tensors of the same shapes and dtypes.

    Per trained layer l with input A_l (n, k_in) and pre-activation (n, k_out): the backward of
    the signals B_l (k_out × k_in) for l > 1, the float64 products A_l A_lᵀ and B_l B_lᵀ, and
    with ``forward`` the forward A_l (k_in × k_out).
    """
    fwd = net.forward_layers(X)
    shapes = [(A.shape[1], z.shape[1]) for A, z in zip(fwd.inputs, fwd.preacts, strict=True)]
    n, dev, dt = X.shape[0], X.device, X.dtype

    def rand(rows: int, cols: int, dtype: torch.dtype = dt) -> torch.Tensor:
        return torch.randn(rows, cols, dtype=dtype, device=dev)

    products = [(rand(n, k_out), rand(k_out, k_in)) for k_in, k_out in shapes[1:]]
    if forward:
        products += [(rand(n, k_in), rand(k_in, k_out)) for k_in, k_out in shapes]
    gram = [rand(n, k, torch.float64) for shape in shapes for k in shape]

    def run() -> None:
        with no_tf32():
            for left, right in products:
                torch.mm(left, right)
            for M in gram:
                torch.mm(M, M.T)

    return run


def reference_bytes(net: Network, n: int, itemsize: int) -> int:
    """J (n × P) and its transpose-contraction workspace: ~2 n·P values."""
    return 2 * n * sum(w.numel() for w in net.trained_weights()) * itemsize


def measure(args: argparse.Namespace, width: int) -> str:
    """One table row for width m."""
    dtype = DTYPES[args.dtype]
    depth = 1 if args.arch == "two_layer" else args.depth
    cfg = RunConfig(arch=args.arch, width=width, depth=depth, data=DataConfig(n=args.n, d=args.d))
    net = build_network(cfg, dtype).to(args.device)
    X = make_dataset(cfg).X.to(device=args.device, dtype=dtype)
    fwd = net.forward_layers(X)
    t = best_times(
        {
            "ours": lambda: layer_grams(fwd),
            "floor": gemm_floor(net, X, forward=False),
            "full": lambda: layer_grams(net.forward_layers(X)),
            "full_floor": gemm_floor(net, X, forward=True),
        },
        args.device,
        args.repeats,
    )
    ours, floor, full, full_floor = t["ours"], t["floor"], t["full"], t["full_floor"]
    row = (
        f"{width:>6} {cfg.parameter_count():>10} {ours:8.4f} {floor:8.4f} {ours / floor:10.2f} "
        f"{full:10.4f} {full / full_floor:6.2f} "
    )
    need = reference_bytes(net, args.n, dtype.itemsize) / 2**30
    if need > args.ref_max_gib:
        return row + f"skipped: J needs ~{need:.0f} GiB > --ref-max-gib {args.ref_max_gib:.0f}"
    try:
        reference = jacobian_ntk(net, X)  # also the warm-up
        timing: dict[str, Callable[[], object]] = {"ref": lambda: jacobian_ntk(net, X)}
        ref = best_times(timing, args.device, args.ref_repeats, warmup=False)["ref"]
    except torch.cuda.OutOfMemoryError:
        return row + "reference out of memory"
    ntk = torch.stack(layer_grams(fwd)).sum(dim=0)
    diff = float((reference - ntk).norm() / ntk.norm())
    return row + f"{ref:12.3f} {ref / ours:8.1f} {ref / full:14.1f}  (rel. diff {diff:.1e})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", default="fc", choices=["two_layer", "fc", "resnet"])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--d", type=int, default=32)
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--widths", default="1024,4096", help="comma-separated widths m")
    parser.add_argument("--dtype", default="float64", choices=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=20, help="rounds of our timings")
    parser.add_argument("--ref-repeats", type=int, default=2)
    default_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 / 2
    parser.add_argument(
        "--ref-max-gib",
        type=float,
        default=default_gib,
        help="skip the reference past this memory estimate (default: half the RAM)",
    )
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads (0: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"device={args.device} arch={args.arch} n={args.n} d={args.d} H={args.depth} "
        f"dtype={args.dtype} threads={torch.get_num_threads()} best of {args.repeats} rounds "
        f"(reference: best of {args.ref_repeats})"
    )
    print(
        f"{'m':>6} {'P':>10} {'ours s':>8} {'floor s':>8} {'ours/floor':>10} {'ours+fwd s':>10} "
        f"{'/floor':>6} {'reference s':>12} {'ref/ours':>8} {'ref/(ours+fwd)':>14}"
    )
    for width in args.widths.split(","):
        print(measure(args, int(width)), flush=True)


if __name__ == "__main__":
    main()
