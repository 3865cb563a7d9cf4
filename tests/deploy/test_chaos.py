"""The chaos suite: faults during real sweeps, then every metric of every run compared, value for
value, with an uninterrupted run of the same config (``worker.train.train`` in this process).

On the compose topology as processes (two dispatchers, two Ray worker nodes) against a
PostgreSQL cluster this test starts itself (so it can restart it), one sweep per fault:

- ``worker``: SIGKILL the Ray worker process training a run (not its node);
- ``dispatcher``: SIGKILL the leading dispatcher (the standby takes over);
- ``postgres``: restart PostgreSQL mid-sweep (every connection and the leader's lock drop);
- ``submitters``: 50 clients submit at once with Idempotency-Keys, each retrying after a
  timeout until it has an answer: every client gets its sweep exactly once.

And on the embedded service (``overparam serve``: SQLite, a local Ray):

- ``service``: SIGKILL the service mid-sweep and start it again;
- ``submitters-sqlite``: the 50 submitters.

Each fault's line (tried,
runs finished, points compared, lost, different) is printed and written to
``$OVERPARAM_TEST_ARTIFACTS/chaos.json``; lost and different must be 0 and no run non-final.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import create_engine, select

from services.models import DispatcherRecord
from tests.deploy.topology import (
    FAST_NODE_DEATH,
    Patient,
    Topology,
    cmdline,
    free_port,
    marked,
    sigkill,
)
from tests.test_serve import start as start_serve
from tests.test_serve import stop, wait_ready
from worker.config import RunConfig
from worker.events import MetricBatch
from worker.metric_names import STEP_TIME
from worker.train import train

pytestmark = [pytest.mark.slow, pytest.mark.postgres]

PG_BIN = next(iter(sorted(Path("/usr/lib/postgresql").glob("*/bin"))), Path("/usr/bin"))
FINAL = {"succeeded", "diverged", "failed", "cancelled"}
STEPS, CHECKPOINT_EVERY = 1500, 250
BASE = {
    "data": {"n": 16, "d": 4},
    "width": 64,
    "steps": STEPS,
    "gram_every": 25,
    "weights_every": 50,
    "checkpoint_every": CHECKPOINT_EVERY,
    "emit_every": 25,
}
RESULTS: dict[str, dict[str, int]] = {}


# -- a PostgreSQL cluster of the test's own ----------------------------------------------------


class Postgres:
    """initdb + pg_ctl in a temporary directory, run as the ``postgres`` user (never root)."""

    def __init__(self) -> None:
        self.dir = Path(f"/tmp/ovp-pg-{uuid.uuid4().hex[:8]}")
        self.port = free_port()
        self.url = f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/chaos"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True, capture_output=True)

    def start(self) -> Postgres:
        self.dir.mkdir()
        shutil.chown(self.dir, "postgres", "postgres")
        self._as_postgres(str(PG_BIN / "initdb"), "-D", str(self.dir / "data"), "-U", "postgres",
                          "--auth=trust")  # fmt: skip
        self.ctl("start")
        self._as_postgres(str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port),
                          "-U", "postgres", "chaos")  # fmt: skip
        return self

    def ctl(self, action: str) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._as_postgres(str(PG_BIN / "pg_ctl"), "-D", str(self.dir / "data"), "-o", options,
                          "-l", str(self.dir / "log"), "-w", "-m", "fast", action)  # fmt: skip

    def stop(self) -> None:
        try:
            self.ctl("stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def stack() -> Iterator[tuple[Topology, Postgres]]:
    if shutil.which("runuser") is None or not (PG_BIN / "initdb").exists():
        pytest.skip("needs PostgreSQL's initdb and runuser to start a cluster of its own")
    postgres = Postgres().start()
    topo = Topology(postgres.url, workers=2, dispatchers=2, extra_env={"ray-head": FAST_NODE_DEATH})
    try:
        yield topo.start(), postgres
    finally:
        topo.close()
        postgres.stop()


@pytest.fixture(scope="module", autouse=True)
def results() -> Iterator[None]:
    """Print and save every fault's line once the module's tests have run."""
    yield
    write_results()


def write_results() -> None:
    lines = [
        f"{'fault':<18} {'tried':>5} {'runs':>5} {'compared':>9} {'lost':>5} {'differ':>6}"
        f" {'slowest answer':>15}"
    ]
    for fault, row in RESULTS.items():
        slowest = f"{row['slowest_answer_ms']} ms" if "slowest_answer_ms" in row else ""
        lines.append(
            f"{fault:<18} {row['tried']:>5} {row['runs']:>5} {row['compared']:>9} "
            f"{row['lost']:>5} {row['different']:>6} {slowest:>15}"
        )
    print("\n" + "\n".join(lines))
    artifacts = os.environ.get("OVERPARAM_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        (Path(artifacts) / "chaos.json").write_text(json.dumps(RESULTS, indent=2))


# -- comparing with uninterrupted runs -----------------------------------------------------------


def stored_points(api: httpx.Client, run_id: int) -> dict[tuple[str, int], float]:
    out: dict[tuple[str, int], float] = {}
    params: dict[str, Any] = {"limit": 100_000}
    while True:
        page = api.get(f"/api/v1/runs/{run_id}/metrics", params=params).json()
        for p in page["data"]:
            value = p["value"]
            out[(p["metric"], p["step"])] = (
                float(value) if not isinstance(value, str) else {"NaN": math.nan,
                "Infinity": math.inf, "-Infinity": -math.inf}[value]
            )  # fmt: skip
        if not page["next_cursor"]:
            return out
        params["cursor"] = page["next_cursor"]


def reference_points(config: dict[str, Any]) -> dict[tuple[str, int], float]:
    """Every point of an uninterrupted run of ``config``, trained here."""
    events = train(RunConfig.model_validate(config))
    return {(m, s): v for e in events if isinstance(e, MetricBatch) for m, s, v in e.points}


def compare(fault: str, api: httpx.Client, runs: list[dict[str, Any]], tried: int) -> None:
    """Record the fault's line and fail on any lost or different point or non-final run."""
    compared = lost = different = 0
    for run in runs:
        want = reference_points(run["config"])
        got = stored_points(api, run["id"])
        for key, value in want.items():
            if key[0] == STEP_TIME:  # wall time: only its presence is comparable
                lost += key not in got
                continue
            compared += 1
            if key not in got:
                lost += 1
            elif not (got[key] == value or (math.isnan(got[key]) and math.isnan(value))):
                different += 1
        assert got.keys() <= want.keys(), f"run {run['id']}: points no uninterrupted run has"
    RESULTS[fault] = {
        "tried": tried,
        "runs": len(runs),
        "compared": compared,
        "lost": lost,
        "different": different,
    }
    assert [r["status"] for r in runs] == ["succeeded"] * len(runs), [r["error"] for r in runs]
    assert (lost, different) == (0, 0), RESULTS[fault]


# -- helpers -----------------------------------------------------------------------------------


def runs_of(api: httpx.Client, sweep_id: int) -> list[dict[str, Any]]:
    params = {"sweep_id": sweep_id, "fields": ["config"], "limit": 1000}
    return api.get("/api/v1/runs", params=params).json()["data"]  # type: ignore[no-any-return]


def submit(api: httpx.Client, name: str, seeds: list[int]) -> int:
    spec = {"name": name, "base": BASE, "grid": {"seed": seeds}}
    return int(api.post("/api/v1/sweeps", json=spec).json()["id"])


def wait(api: httpx.Client, check: Callable[[], bool], what: str, timeout: float = 300) -> None:
    Topology.wait_for(check, time.monotonic() + timeout, what)


def past_a_checkpoint(api: httpx.Client, sweep_id: int) -> bool:
    return any(
        r["status"] == "running" and r["summary"].get("steps_done", 0) > CHECKPOINT_EVERY + 25
        for r in runs_of(api, sweep_id)
    )


def finished(api: httpx.Client, sweep_id: int) -> list[dict[str, Any]]:
    wait(api, lambda: all(r["status"] in FINAL for r in runs_of(api, sweep_id)), "all final")
    return runs_of(api, sweep_id)


def training_task(pid: int) -> bool:
    """A Ray worker process running a run (Ray titles it after the task, padded)."""
    title = cmdline(pid)[0].strip()
    return title.startswith("ray::") and title.endswith("run_training")


def leader(topo: Topology) -> str:
    engine = create_engine(topo.addresses.database_url)
    try:
        with engine.connect() as conn:
            query = select(DispatcherRecord.pid).where(DispatcherRecord.leader.is_(True))
            pids = set(conn.scalars(query))
    finally:
        engine.dispose()
    names = [n for n, p in topo.procs.items() if p.service == "dispatcher" and p.pid in pids]
    return next(n for n in names if topo.procs[n].alive())


# -- the faults ---------------------------------------------------------------------------------


def test_a_killed_ray_worker_process(stack) -> None:  # type: ignore[no-untyped-def]
    topo, _ = stack
    with topo.client() as api:
        sweep = submit(api, "worker", [0, 1])
        wait(api, lambda: past_a_checkpoint(api, sweep), "a run past a checkpoint")
        training = [p for p in marked(f"{topo.id}/") if training_task(p)]
        assert training, topo.report()
        sigkill(training[:1])
        runs = finished(api, sweep)
        assert max(r["attempt"] for r in runs) >= 2, "the killed run was retried"
        compare("worker", api, runs, tried=1)


def test_a_killed_leading_dispatcher(stack) -> None:  # type: ignore[no-untyped-def]
    topo, _ = stack
    with topo.client() as api:
        sweep = submit(api, "dispatcher", [2, 3])
        wait(api, lambda: past_a_checkpoint(api, sweep), "a run past a checkpoint")
        first = leader(topo)
        topo.kill_dispatcher(first)
        topo.add_dispatcher()  # the next standby, as a restarted container would be
        runs = finished(api, sweep)
        assert leader(topo) != first
        compare("dispatcher", api, runs, tried=1)


def test_a_postgres_restart(stack) -> None:  # type: ignore[no-untyped-def]
    topo, postgres = stack
    with topo.client() as api:
        sweep = submit(api, "postgres", [4, 5])
        wait(api, lambda: past_a_checkpoint(api, sweep), "a run past a checkpoint")
        postgres.ctl("restart")

        def answers() -> bool:
            try:
                return api.get("/readyz").status_code == 200
            except httpx.HTTPError:
                return False

        wait(api, answers, "the service ready again after the restart", timeout=120)
        compare("postgres", api, finished(api, sweep), tried=1)


def fifty_submitters(
    fault: str, base_url: str, headers: dict[str, str], log: Callable[[], str]
) -> None:
    """50 clients submit a sweep each at once with an Idempotency-Key, retrying after a
    timeout (the first tries give up after 50 ms, so their requests may still be served) until
    they have an answer: every client gets its sweep exactly once, no 5xx, and every run's
    points equal an uninterrupted run's. The slowest answer is recorded (a figure, not a
    threshold: these machines are shared)."""
    answers: dict[int, set[int]] = {}
    latency: list[float] = []
    errors: list[str] = []

    def client(index: int) -> None:
        spec = {"name": f"{fault}-{index}", "base": BASE | {"steps": 60}, "grid": {"seed": [index]}}
        key = {"Idempotency-Key": f"client-{index}-{uuid.uuid4().hex}"}
        began = time.monotonic()
        timeout = 0.05
        while time.monotonic() - began < 120:
            try:
                response = httpx.post(
                    f"{base_url}/api/v1/sweeps", json=spec, headers=key | headers, timeout=timeout
                )
            except httpx.TimeoutException:
                timeout = min(2 * timeout, 10)
                continue
            if response.status_code >= 500:
                errors.append(f"{index}: {response.status_code} {response.text[:200]}")
            if response.status_code == 201:
                answers.setdefault(index, set()).add(response.json()["id"])
                latency.append(time.monotonic() - began)
                return
            time.sleep(0.1)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(50)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
    assert not errors, f"{errors}\n{log()}"
    assert len(answers) == 50 and all(len(ids) == 1 for ids in answers.values()), answers
    with httpx.Client(base_url=base_url, headers=headers, timeout=30, transport=Patient()) as api:
        sweeps = api.get("/api/v1/sweeps", params={"limit": 1000}).json()["data"]
        names = sorted(s["name"] for s in sweeps if s["name"].startswith(f"{fault}-"))
        assert names == sorted(f"{fault}-{i}" for i in range(50)), "each sweep exactly once"
        runs = [run for ids in answers.values() for sweep in ids for run in finished(api, sweep)]
        compare(fault, api, runs, tried=50)
    RESULTS[fault]["slowest_answer_ms"] = round(1000 * max(latency))


def test_fifty_submitters_with_retries_each_get_their_sweep_once(stack) -> None:  # type: ignore[no-untyped-def]
    topo, _ = stack
    fifty_submitters("submitters", topo.base_url, topo.headers, lambda: topo.tail("api", 200))


# -- the embedded service on SQLite (``overparam serve``) -----------------------------------------


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A data folder and a port for ``overparam serve`` (SQLite, a local Ray of 2 CPUs)."""
    yield tmp_path_factory.mktemp("embedded"), free_port()


def serve(data_dir: Path, port: int) -> subprocess.Popen[bytes]:
    process = start_serve(data_dir, port, cpus=2, log=data_dir / "serve.log")
    wait_ready(f"http://127.0.0.1:{port}", process)
    return process


def test_a_killed_service_on_sqlite(embedded: tuple[Path, int]) -> None:
    """SIGKILL ``overparam serve`` (API, dispatcher and the Ray driver in one process) mid-sweep
    and start it again: the runs resume from their checkpoints and every point matches."""
    data_dir, port = embedded
    process = serve(data_dir, port)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as api:
            sweep = submit(api, "service", [6, 7])
            wait(api, lambda: past_a_checkpoint(api, sweep), "a run past a checkpoint")
            os.kill(process.pid, signal.SIGKILL)  # the service; its Ray is cleaned at restart
            process.wait(30)
            process = serve(data_dir, port)
            runs = finished(api, sweep)
            assert max(r["attempt"] for r in runs) >= 2, "the interrupted runs were retried"
            compare("service", api, runs, tried=1)
    finally:
        stop(process, data_dir / "serve.log")


def test_fifty_submitters_on_sqlite(embedded: tuple[Path, int]) -> None:
    data_dir, port = embedded
    process = serve(data_dir, port)
    try:
        log = lambda: (data_dir / "serve.log").read_text()[-20000:]  # noqa: E731
        fifty_submitters("submitters-sqlite", f"http://127.0.0.1:{port}", {}, log)
    finally:
        stop(process, data_dir / "serve.log")
