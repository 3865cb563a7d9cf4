"""``GET /metrics`` in one process (the multiprocess case is tests/test_serve_workers.py): who may
scrape it; requests counted by route template and status; points counted once committed; the
state gauges read from the database (runs by state and owner, queue, dispatchers, Ray's GPUs);
the pool's connection gauges; request ids on answers and JSON log lines."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from services.db import make_engine, make_sessionmaker, session_scope
from services.logs import REQUEST_ID, JsonFormatter, RequestIdFilter, log_config
from services.models import DispatcherRecord, Run, utcnow
from services.state_metrics import ServiceState
from services.telemetry import instrument_pool
from services.users import create_user
from tests.conftest import make_settings

V1 = "/api/v1"
SPEC = {"base": {"data": {"n": 8, "d": 4}, "width": 16, "steps": 10}, "grid": {"seed": [0, 1]}}


def scrape(client: TestClient, **headers: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    """The answer of /metrics as {(sample name, sorted labels): value}."""
    answer = client.get("/metrics", headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_requests_are_counted_by_route_template_and_status(client: TestClient) -> None:
    route = "/api/v1/runs/{run_id}"
    before = {s: sample("overparam_http_request_duration_seconds_count", method="GET",
                        route=route, status=s) for s in ("200", "404")}  # fmt: skip
    run_id = client.post(f"{V1}/runs", json={"config": {}, "external": True}).json()["id"]
    assert client.get(f"{V1}/runs/{run_id}").status_code == 200
    assert client.get(f"{V1}/runs/{run_id + 1000}").status_code == 404
    assert client.get(f"{V1}/runs/{run_id + 2000}").status_code == 404
    seen = scrape(client)
    count = "overparam_http_request_duration_seconds_count"
    labels = (("method", "GET"), ("route", route))
    assert seen[(count, (*labels, ("status", "200")))] == before["200"] + 1
    assert seen[(count, (*labels, ("status", "404")))] == before["404"] + 2
    assert not any(f"/runs/{run_id}" in str(key) for key in seen), "no raw paths"
    unmatched = sample(count, method="GET", route="unmatched", status="404")
    client.get("/no/such/page")
    assert sample(count, method="GET", route="unmatched", status="404") == unmatched + 1


def test_points_are_counted_when_their_transaction_commits(client: TestClient) -> None:
    run_id = client.post(f"{V1}/runs", json={"config": {}, "external": True}).json()["id"]
    before = sample("overparam_metric_points_ingested_total")
    batch = [{"metric": "loss", "step": s, "value": 1.0} for s in range(30)]
    assert client.post(f"{V1}/runs/{run_id}/metrics", json={"points": batch}).status_code == 200
    assert sample("overparam_metric_points_ingested_total") == before + 30
    again = [*batch[20:], {"metric": "loss", "step": 30, "value": 0.5}]
    client.post(f"{V1}/runs/{run_id}/metrics", json={"points": again})
    assert sample("overparam_metric_points_ingested_total") == before + 31, "new points only"


def test_points_of_a_rolled_back_transaction_are_not_counted(db_url: str) -> None:
    from services.metrics import write_points

    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as db:
        run = Run(config={}, external=True, status="running")
        db.add(run)
    before = sample("overparam_metric_points_ingested_total")
    with sessions() as db:
        write_points(db_session=db, run_id=run.id, points=[("loss", 0, 1.0), ("loss", 1, 2.0)])
        db.rollback()
    assert sample("overparam_metric_points_ingested_total") == before
    with session_scope(sessions) as db:
        write_points(db_session=db, run_id=run.id, points=[("loss", 0, 1.0)])
    assert sample("overparam_metric_points_ingested_total") == before + 1
    engine.dispose()


def test_the_dispatchers_points_are_counted_as_its_batches_commit(db_url: str) -> None:
    from services.dispatcher import Dispatcher, RunProgress
    from worker.events import MetricBatch

    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    with session_scope(sessions) as db:
        run = Run(config={}, status="running")
        db.add(run)
    dispatcher = Dispatcher(make_settings(db_url), sessions, submit=lambda launch: None)
    before = sample("overparam_metric_points_ingested_total")
    batch = MetricBatch.of([("loss", step, 1.0) for step in range(5)])
    dispatcher._record(run.id, batch, RunProgress())
    dispatcher._record(run.id, batch, RunProgress())  # a re-sent batch: nothing new
    assert sample("overparam_metric_points_ingested_total") == before + 5
    engine.dispose()


def state(db_url: str) -> dict[tuple[str, tuple[Any, ...]], float]:
    engine = make_engine(db_url)
    try:
        collected = ServiceState(make_sessionmaker(engine)).collect()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in collected
            for s in family.samples
        }
    finally:
        engine.dispose()


def test_state_gauges_are_read_from_the_database(client: TestClient, db_url: str) -> None:
    empty = state(db_url)
    assert empty[("overparam_database_up", ())] == 1
    assert empty[("overparam_runs", (("state", "queued"),))] == 0
    assert empty[("overparam_queue_oldest_wait_seconds", ())] == 0
    assert empty[("overparam_ray_nodes", ())] == 0
    assert ("overparam_dispatcher_heartbeat_age_seconds", ()) not in empty, "none ever led"
    assert ("overparam_ray_gpu_free_ratio", ()) not in empty, "no GPUs"

    sweep = client.post(f"{V1}/sweeps", json=SPEC).json()
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        alice = create_user(db_session=db, name="alice", role="member")[0]
        running = db.get(Run, sweep["run_ids"][0])
        assert running is not None
        running.status, running.owner_id = "running", alice.id
        running.resources = {"cpus": 1.0, "gpus": 0.5, "memory_bytes": 1}
        running.points = 40
        db.get(Run, sweep["run_ids"][1]).created_at = utcnow() - timedelta(hours=1)  # type: ignore[union-attr]
        nodes = [{"CPU": 4.0, "GPU": 1.0, "memory": 1e9}, {"CPU": 4.0, "GPU": 1.0, "memory": 1e9}]
        db.add(DispatcherRecord(id="a", host="h", pid=1, leader=True, nodes=nodes))
        db.add(DispatcherRecord(id="b", host="h", pid=2, leader=False))
        stale = utcnow() - timedelta(minutes=5)
        db.add(DispatcherRecord(id="c", host="h", pid=3, leader=True, heartbeat_at=stale))
    engine.dispose()

    seen = state(db_url)
    assert seen[("overparam_runs", (("state", "queued"),))] == 1
    assert seen[("overparam_runs", (("state", "running"),))] == 1
    assert seen[("overparam_user_runs", (("state", "running"), ("user", "alice")))] == 1
    assert seen[("overparam_user_runs", (("state", "queued"), ("user", "local")))] == 1
    assert seen[("overparam_user_runs", (("state", "running"), ("user", "local")))] == 0
    assert seen[("overparam_metric_points_stored", ())] == 40
    assert seen[("overparam_user_metric_points", (("user", "alice"),))] == 40
    assert seen[("overparam_user_metric_points", (("user", "local"),))] == 0
    assert seen[("overparam_queue_oldest_wait_seconds", ())] >= 3600
    assert 0 <= seen[("overparam_dispatcher_heartbeat_age_seconds", ())] < 300, "the newest"
    assert seen[("overparam_dispatchers", (("role", "leader"),))] == 1, "the stale one is gone"
    assert seen[("overparam_dispatchers", (("role", "standby"),))] == 1
    assert seen[("overparam_ray_nodes", ())] == 2
    assert seen[("overparam_ray_gpus", ())] == 2
    assert seen[("overparam_ray_gpu_free_ratio", ())] == pytest.approx(0.75)
    assert scrape(client)[("overparam_runs", (("state", "running"),))] == 1, "served too"


def test_an_unreachable_database_is_a_gauge_not_an_error() -> None:
    engine = make_engine("sqlite:////nonexistent/dir/overparam.db")
    samples = [s for f in ServiceState(make_sessionmaker(engine)).collect() for s in f.samples]
    assert [(s.name, s.value) for s in samples] == [("overparam_database_up", 0)]
    engine.dispose()


def test_pool_gauges_follow_checkouts(db_url: str) -> None:
    engine = make_engine(db_url, pool_size=1, max_overflow=2)
    instrument_pool(engine)
    in_use, overflow = (
        "overparam_db_pool_connections_in_use",
        "overparam_db_pool_overflow_connections",
    )
    before = sample(in_use), sample(overflow)
    with engine.connect(), engine.connect():
        assert sample(in_use) == before[0] + 2
        assert sample(overflow) == before[1] + 1, "the second is beyond the pool's one"
    assert sample(in_use) == before[0]
    engine.dispose()
    assert sample(overflow) == before[1]


def make_admin(db_url: str) -> str:
    """An admin (a service that requires tokens starts only with one); the admin's token."""
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        token = create_user(db_session=db, name="ada", role="admin")[1]
    engine.dispose()
    return token


@pytest.fixture
def closed_lab(db_url: str) -> Iterator[TestClient]:
    make_admin(db_url)
    settings = make_settings(db_url, auth="required", metrics_token="s3cret-scrape")
    with TestClient(create_app(settings)) as c:
        yield c


def test_metrics_need_the_metrics_token_when_set(closed_lab: TestClient) -> None:
    assert closed_lab.get("/metrics").status_code == 401
    wrong = closed_lab.get("/metrics", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401
    assert wrong.headers["content-type"].startswith("application/problem+json")
    assert scrape(closed_lab, Authorization="Bearer s3cret-scrape")


@pytest.mark.parametrize("metrics_token", [None, ""])
def test_metrics_are_closed_when_tokens_are_required_and_no_metrics_token(
    db_url: str, metrics_token: str | None
) -> None:
    """An empty OVERPARAM_METRICS_TOKEN (compose's ``${METRICS_TOKEN:-}``) is no token."""
    admin = {"Authorization": f"Bearer {make_admin(db_url)}"}
    settings = make_settings(db_url, auth="required", metrics_token=metrics_token)
    with TestClient(create_app(settings)) as c:
        answer = c.get("/metrics", headers=admin)
        assert c.get("/metrics").status_code == 401
    assert answer.status_code == 401 and "OVERPARAM_METRICS_TOKEN" in answer.json()["detail"]


def test_metrics_obey_the_host_check(db_url: str) -> None:
    settings = make_settings(db_url, allowed_hosts=["localhost"])
    with TestClient(create_app(settings), base_url="http://evil.example") as c:
        assert c.get("/metrics").status_code == 400


def test_every_answer_has_a_request_id(client: TestClient) -> None:
    mine = client.get("/livez", headers={"X-Request-ID": "job-42.retry_1"})
    assert mine.headers["x-request-id"] == "job-42.retry_1"
    forged = client.get("/livez", headers={"X-Request-ID": "a\tb" + "x" * 200})
    assert len(forged.headers["x-request-id"]) == 32, "replaced by a new one"
    ids = {client.get("/api/v1/runs").headers["x-request-id"] for _ in range(3)}
    assert len(ids) == 3


def test_json_log_lines_carry_the_request_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("tests.json_logs")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        token = REQUEST_ID.set("req-1")
        logger.warning("run %d queued", 7)
        REQUEST_ID.reset(token)
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("outside a request")
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines() if line[:1] == "{")
    assert first["message"] == "run 7 queued" and first["request_id"] == "req-1"
    assert first["level"] == "WARNING" and first["logger"] == "tests.json_logs"
    assert second["request_id"] is None and "ValueError: boom" in second["exception"]
    config = log_config("json")
    assert set(config["loggers"]) == {"uvicorn", "uvicorn.error", "uvicorn.access"}
    assert config["handlers"]["stderr"]["filters"] == ["request_id"]


def test_gauges_of_workers_that_are_gone_are_dropped(tmp_path: Any) -> None:
    import os
    import subprocess
    import sys

    from api.routes.monitoring import forget_dead_processes

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    for name in (f"gauge_livesum_{gone}.db", f"gauge_livesum_{os.getpid()}.db",
                 f"counter_{gone}.db", "gauge_livesum_x.db"):  # fmt: skip
        (tmp_path / name).write_bytes(b"")
    forget_dead_processes(tmp_path)
    left = {p.name for p in tmp_path.iterdir()}
    kept = {f"counter_{gone}.db", f"gauge_livesum_{os.getpid()}.db", "gauge_livesum_x.db"}
    assert left == kept, "counts stay; the live worker's and odd names stay"
