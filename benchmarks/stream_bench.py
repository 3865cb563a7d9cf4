"""Live streams: a sweep's wall time with 100 subscribers against none, and every subscriber
gets every point.

    .venv/bin/python -m benchmarks.stream_bench [--subscribers 100] [--rounds 2]
                                               [--backends sqlite,postgresql]

The embedded service (API, dispatcher and a local Ray in one process, as ``overparam serve``)
trains the same small sweep again and again, alternating rounds without and with subscribers.
The subscribers are asyncio SSE clients in this process, all on ``GET /sweeps/{id}/stream``
(loss and λ_min, as the dashboard and ``overparam watch`` follow a sweep), connected before the
sweep is submitted; each checks at the end that it received every stored point of those
metrics exactly once. Prints the median wall time of each kind of round and their ratio
(target: ≤ 1.5×). A benchmark, not a test: numbers vary with the machine's load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from typing import Any

import httpx

from benchmarks.harness import ROOT, backends, free_port, print_table, serving

NAMES = ("loss", "ntk_lambda_min")
SPEC = {
    "name": "stream-bench",
    "base": {
        "arch": "fc",
        "depth": 2,
        "width": 64,
        "data": {"n": 16, "d": 8},
        "steps": 1500,
        "gram_every": 10,
        "emit_every": 25,
        "weights_every": 100,
    },
    "grid": {"seed": [0, 1, 2, 3]},
}


def serve_embedded(database_url: str, data_dir: str) -> AbstractContextManager[str]:
    """The one-process service (API + dispatcher + local Ray on 2 CPUs)."""
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "--factory", "api.main:create_app"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    env = {
        "OVERPARAM_DATABASE_URL": database_url,
        "OVERPARAM_DATA_DIR": data_dir,
        "OVERPARAM_CHECKPOINT_DIR": f"{data_dir}/checkpoints",
        "OVERPARAM_RAY_NUM_CPUS": "2",
        "OVERPARAM_AUTH": "off",
        "PYTHONPATH": str(ROOT),
    }
    return serving(command, env, port, "/readyz")


async def subscribe(
    http: httpx.AsyncClient, sweep_id: int, ready: asyncio.Event
) -> set[tuple[int, str, int]]:
    """Every (run, metric, step) the sweep's stream sends, until its end; raises on a repeat."""
    got: set[tuple[int, str, int]] = set()
    params = [("name", name) for name in NAMES]
    async with http.stream("GET", f"/api/v1/sweeps/{sweep_id}/stream", params=params) as response:
        ready.set()
        event = ""
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "metrics":
                data = json.loads(line[6:])
                for point in data["points"]:
                    key = (data["run_id"], point["metric"], point["step"])
                    if key in got:
                        raise AssertionError(f"{key} received twice")
                    got.add(key)
            elif line.startswith("data: ") and event == "end":
                return got
    raise AssertionError("the stream ended without an end event")


async def one_round(base: str, subscribers: int) -> tuple[float, bool]:
    """Seconds from submitting the sweep until every run is final; whether every subscriber
    got every point."""
    limits = httpx.Limits(max_connections=subscribers + 10, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base, timeout=600, limits=limits) as http:
        # The sweep exists (queued) before the subscribers connect; its runs start when the
        # dispatcher picks them, so the clock starts at creation either way.
        start = time.perf_counter()
        created = (await http.post("/api/v1/sweeps", json=SPEC)).json()
        readies = [asyncio.Event() for _ in range(subscribers)]
        tasks = [asyncio.create_task(subscribe(http, created["id"], ready)) for ready in readies]
        while True:
            runs = (await http.get("/api/v1/runs", params={"sweep_id": created["id"]})).json()
            if all(r["status"] in ("succeeded", "diverged", "failed") for r in runs["data"]):
                break
            await asyncio.sleep(0.05)
        seconds = time.perf_counter() - start
        received = await asyncio.gather(*tasks)
        stored = await stored_points(http, created["id"])
        assert all(r["status"] == "succeeded" for r in runs["data"]), runs
    return seconds, all(got == stored for got in received)


async def stored_points(http: httpx.AsyncClient, sweep_id: int) -> set[tuple[int, str, int]]:
    out: set[tuple[int, str, int]] = set()
    params: dict[str, Any] = {"name": list(NAMES), "limit": 100_000}
    while True:
        page = (await http.get(f"/api/v1/sweeps/{sweep_id}/metrics", params=params)).json()
        out |= {(p["run_id"], p["metric"], p["step"]) for p in page["data"]}
        if not page["next_cursor"]:
            return out
        params["cursor"] = page["next_cursor"]


def rounds(base: str, subscribers: int, count: int) -> Iterator[tuple[int, float, bool]]:
    asyncio.run(one_round(base, 0))  # warm-up: Ray workers, imports
    for _ in range(count):
        for n in (0, subscribers):
            seconds, complete = asyncio.run(one_round(base, n))
            yield n, seconds, complete


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2, help="rounds of each kind")
    parser.add_argument("--backends", default="sqlite,postgresql")
    args = parser.parse_args()
    rows = []
    load = os.getloadavg()[0]
    with backends(args.backends.split(",")) as selected:
        for backend in selected:
            with tempfile.TemporaryDirectory() as data, serve_embedded(backend.ours, data) as base:
                times: dict[int, list[float]] = {0: [], args.subscribers: []}
                complete = True
                for n, seconds, ok in rounds(base, args.subscribers, args.rounds):
                    times[n].append(seconds)
                    complete = complete and ok
            none, many = (statistics.median(times[n]) for n in (0, args.subscribers))
            rows.append(
                [
                    backend.name,
                    f"{none:.1f}",
                    f"{many:.1f}",
                    f"{many / none:.2f}×",
                    "yes" if complete else "NO",
                    "≤ 1.5×",
                ]
            )
    print_table(
        f"A 4-run sweep, live subscribers to its stream (median wall s over {args.rounds} "
        f"rounds; load average {load:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)",
        ["backend", "no subscribers", f"{args.subscribers} subscribers", "ratio",
         "every point to every subscriber", "target"],
        rows,
    )  # fmt: skip


if __name__ == "__main__":
    main()
