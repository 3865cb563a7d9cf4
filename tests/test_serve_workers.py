"""``overparam serve --workers 2`` beside ``overparam dispatch`` (real processes, SQLite, a local
Ray): ``GET /metrics`` follows a sweep (points stored grow, runs move from queued to running to
cancelled), adds up both workers' counts (requests, REST points, a live stream's subscriber
seen by whichever worker answers), and the JSON log lines carry the request ids."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.deploy.topology import free_port
from tests.test_serve import stop

pytestmark = pytest.mark.slow

OVERPARAM = [sys.executable, "-m", "overparam.cli"]
LONG = {
    "base": {"data": {"n": 8, "d": 4}, "width": 16, "steps": 1_000_000},
    "grid": {"seed": [0, 1]},
}
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def environment(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OVERPARAM_", "PROMETHEUS"))}
    return env | {
        "OVERPARAM_DATA_DIR": str(data_dir),
        "OVERPARAM_CHECKPOINT_DIR": str(data_dir / "checkpoints"),
        "OVERPARAM_DATABASE_URL": f"sqlite:///{data_dir}/overparam.db",
        "OVERPARAM_RAY_NUM_CPUS": "1",
        "OVERPARAM_EMBEDDED_DISPATCHER": "false",
        "OVERPARAM_LOG_FORMAT": "json",
    }


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*OVERPARAM, *args],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture
def service(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    env = environment(tmp_path)
    migrated = subprocess.run([*OVERPARAM, "db", "upgrade"], env=env, capture_output=True)
    assert migrated.returncode == 0, migrated.stderr.decode()
    port = free_port()
    dispatcher = spawn(["dispatch"], env, tmp_path / "dispatch.log")
    api = spawn(["serve", "--port", str(port), "--workers", "2"], env, tmp_path / "serve.log")
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            for process, log in ((api, "serve.log"), (dispatcher, "dispatch.log")):
                assert process.poll() is None, (tmp_path / log).read_text()
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, (tmp_path / "serve.log").read_text()
            time.sleep(0.3)
        yield url, tmp_path
    finally:
        stop(api)
        stop(dispatcher)


def scrape(url: str) -> Samples:
    answer = httpx.get(f"{url}/metrics", timeout=10)
    assert answer.status_code == 200, answer.text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def runs(seen: Samples, state: str) -> float:
    return seen[("overparam_runs", (("state", state),))]


def stored(seen: Samples) -> float:
    return seen[("overparam_metric_points_stored", ())]


def until(url: str, check: Callable[[Samples], bool], what: str, timeout: float = 120) -> Samples:
    """Scrape until ``check`` holds (the deadline only ends a test that would hang)."""
    deadline = time.monotonic() + timeout
    while True:
        seen = scrape(url)
        if check(seen):
            return seen
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.3)


def worker_pids(data_dir: Path) -> set[str]:
    """The processes that wrote request counts (``histogram_<pid>.db``)."""
    return {p.stem.rsplit("_", 1)[1] for p in (data_dir / "prometheus").glob("histogram_*.db")}


def read_stream(url: str, run_id: int, events: list[str]) -> None:
    with httpx.stream("GET", f"{url}/api/v1/runs/{run_id}/metrics/stream", timeout=120) as s:
        for line in s.iter_lines():
            events.append(line)
            if line == "event: end":
                return


def test_metrics_follow_a_sweep_and_add_up_both_workers(service: tuple[str, Path]) -> None:
    url, data_dir = service
    api = httpx.Client(base_url=f"{url}/api/v1", timeout=30)
    before = scrape(url)
    assert runs(before, "queued") == runs(before, "running") == stored(before) == 0
    assert before[("overparam_dispatchers", (("role", "leader"),))] == 1
    assert ("overparam_dispatcher_heartbeat_age_seconds", ()) in before
    assert before[("overparam_ray_nodes", ())] == 1

    first, second = api.post("/sweeps", json=LONG).json()["run_ids"]
    events: list[str] = []
    reader = threading.Thread(target=read_stream, args=(url, first, events))
    reader.start()
    # One CPU: the first run trains, the second waits in the queue.
    seen = until(url, lambda s: runs(s, "running") == 1 and stored(s) > 0, "a run stores points")
    assert runs(seen, "queued") == 1
    assert seen[("overparam_user_runs", (("state", "running"), ("user", "local")))] == 1
    later = until(url, lambda s: stored(s) > stored(seen), "more points during the run")
    assert later[("overparam_queue_oldest_wait_seconds", ())] > 0
    until(url, lambda s: s[("overparam_sse_subscribers", ())] == 1, "the stream's reader")

    # Requests and REST points from both workers are added up, whichever worker answers.
    external = api.post("/runs", json={"config": {}, "external": True}).json()["id"]
    route = "/api/v1/runs/{run_id}/metrics"
    count = "overparam_http_request_duration_seconds_count"
    key = (count, (("method", "POST"), ("route", route), ("status", "200")))
    ingested = scrape(url).get(("overparam_metric_points_ingested_total", ()), 0)
    batches = 0
    while len(worker_pids(data_dir)) < 2 or batches < 20:
        assert batches < 500, "one worker answered everything"
        points = [{"metric": "loss", "step": batches * 10 + i, "value": 1.0} for i in range(10)]
        with httpx.Client(timeout=30) as fresh:  # a new connection: either worker may take it
            answer = fresh.post(f"{url}/api/v1/runs/{external}/metrics", json={"points": points})
        assert answer.json() == {"received": 10, "stored": 10}
        batches += 1
    summed = scrape(url)
    assert summed[key] == batches
    assert summed[("overparam_metric_points_ingested_total", ())] == ingested + 10 * batches
    assert ("overparam_db_pool_connections_in_use", ()) in summed

    finished = api.post(f"/runs/{external}/finish", json={"status": "succeeded"})
    assert finished.status_code == 200, finished.text
    for run_id in (first, second):
        assert api.post(f"/runs/{run_id}/cancel").status_code == 200
    done = until(url, lambda s: runs(s, "cancelled") == 2, "both runs cancelled")
    assert runs(done, "succeeded") == 1
    assert runs(done, "running") == runs(done, "queued") == 0
    reader.join(60)
    assert not reader.is_alive() and "event: end" in events
    until(url, lambda s: s[("overparam_sse_subscribers", ())] == 0, "the reader left")

    tagged = httpx.get(f"{url}/livez", headers={"X-Request-ID": "probe-4711"})
    assert tagged.headers["x-request-id"] == "probe-4711"
    deadline = time.monotonic() + 30
    while not any(
        line.get("request_id") == "probe-4711" and line["logger"] == "uvicorn.access"
        for line in json_lines(data_dir / "serve.log")
    ):
        assert time.monotonic() < deadline, "the access line carries the request id"
        time.sleep(0.2)


def json_lines(log: Path) -> list[dict[str, Any]]:
    lines = []
    for text in log.read_text(errors="replace").splitlines():
        if text.startswith("{"):
            lines.append(json.loads(text))
    return lines
