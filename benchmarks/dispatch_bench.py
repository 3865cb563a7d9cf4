"""Dispatch throughput: a sweep of 1,000 tiny runs through the embedded service.

    .venv/bin/python -m benchmarks.dispatch_bench [--runs 1000] [--backends sqlite,postgresql]

The one-process service (API, dispatcher, local Ray on 2 CPUs) trains a sweep of tiny runs
(a two-layer net on 4 points, 5 steps): what is measured is the dispatcher's cost per run —
claiming, submitting the Ray task, recording its metrics, finishing and analysing it — not
training. Prints runs per second from submission until every run is final (target: ≥ 15).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import httpx

from benchmarks.harness import backends, print_table
from benchmarks.stream_bench import serve_embedded

FINAL = ("succeeded", "diverged", "failed", "cancelled")


def spec(runs: int) -> dict[str, object]:
    base = {"arch": "two_layer", "width": 8, "data": {"n": 4, "d": 2}, "steps": 5}
    return {"name": "dispatch-bench", "base": base, "grid": {"seed": list(range(runs))}}


def one_sweep(base: str, runs: int) -> tuple[float, dict[str, int]]:
    with httpx.Client(base_url=base, timeout=600) as http:
        start = time.perf_counter()
        created = http.post("/api/v1/sweeps", json=spec(runs))
        created.raise_for_status()
        sweep_id = created.json()["id"]
        while True:
            counts = http.get(f"/api/v1/sweeps/{sweep_id}").json()["status_counts"]
            if sum(counts.get(status, 0) for status in FINAL) == runs:
                return time.perf_counter() - start, counts
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    load = os.getloadavg()[0]
    with backends(args.backends.split(",")) as selected:
        for backend in selected:
            with tempfile.TemporaryDirectory() as data, serve_embedded(backend.ours, data) as base:
                one_sweep(base, 4)  # warm-up: Ray workers, imports
                seconds, counts = one_sweep(base, args.runs)
            rate = args.runs / seconds
            rows.append([backend.name, str(args.runs), f"{seconds:.1f}", f"{rate:.1f}",
                         str(counts), "≥ 15 runs/s"])  # fmt: skip
    print_table(
        f"Dispatch of tiny runs (load average {load:.1f} → {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs)",
        ["backend", "runs", "seconds", "runs/s", "final states", "target"],
        rows,
    )


if __name__ == "__main__":
    main()
