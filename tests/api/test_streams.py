"""Live streams (SSE) against a real uvicorn server on SQLite and PostgreSQL: a client that
disconnects and reconnects with Last-Event-ID receives every later point exactly once, sees
status changes, keep-alive pings and the end event; the same for a whole sweep."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import uvicorn

from api.main import create_app
from services.db import make_engine, make_sessionmaker, session_scope
from services.metrics import write_points
from services.runs import transition
from tests.conftest import make_settings

V1 = "/api/v1"


@pytest.fixture
def server(db_url: str) -> Iterator[str]:
    """The app served by uvicorn in a thread on a free port; fast polls and pings."""
    app = create_app(make_settings(db_url, stream_poll_s=0.02, stream_ping_s=0.3))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started and thread.is_alive():
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join()
    sock.close()


@dataclass
class Event:
    event: str = "message"
    data: str = ""
    id: str | None = None
    comments: list[str] = field(default_factory=list)

    def json(self) -> Any:
        import json

        return json.loads(self.data)


def events(response: httpx.Response) -> Iterator[Event]:
    """SSE parsing: fields until a blank line; comments are kept on the next event."""
    current = Event()
    for line in response.iter_lines():
        if line == "":
            if current.data or current.event != "message":
                yield current
                current = Event()
            continue
        key, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if key == "":
            current.comments.append(value)
            if value == "ping":
                yield Event(event="ping")
        elif key in ("event", "data", "id"):
            setattr(current, key, value)


def points_of(event: Event) -> list[tuple[str, int, Any]]:
    return [(p["metric"], p["step"], p["value"]) for p in event.json()["points"]]


def batch(steps: range) -> dict[str, Any]:
    points = [{"metric": m, "step": s, "value": s / 10} for s in steps for m in ("loss", "acc")]
    return {"points": points}


def test_run_stream_resumes_from_last_event_id_without_loss_or_repeats(server: str) -> None:
    with httpx.Client(base_url=server) as http:
        run_id = http.post(f"{V1}/runs", json={"config": {}, "external": True}).json()["id"]
        http.post(f"{V1}/runs/{run_id}/metrics", json=batch(range(0, 10))).raise_for_status()
        url = f"{V1}/runs/{run_id}/metrics/stream"
        received: list[tuple[str, int, Any]] = []
        statuses: list[str] = []

        with http.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-cache"
            assert response.headers["x-accel-buffering"] == "no"
            for event in events(response):
                if event.event == "status":
                    statuses.append(event.json()["status"])
                if event.event == "metrics":
                    received += points_of(event)
                    assert event.id == str(max(s for _, s, _ in points_of(event)))
                    last_id = event.id
                    if last_id == "9":
                        break  # the client goes away

        # written while nobody listens
        http.post(f"{V1}/runs/{run_id}/metrics", json=batch(range(10, 20))).raise_for_status()
        http.post(f"{V1}/runs/{run_id}/metrics", json=batch(range(20, 30))).raise_for_status()

        pinged = posted = False
        end = None
        with http.stream("GET", url, headers={"Last-Event-ID": last_id}) as response:
            for event in events(response):
                if event.event == "status":
                    statuses.append(event.json()["status"])
                elif event.event == "metrics":
                    received += points_of(event)
                elif event.event == "ping":
                    pinged = True
                elif event.event == "end":
                    end = event.json()
                    break
                if pinged and not posted and received[-1][1] == 29:
                    posted = True  # while the client listens: more points, then the finish
                    body = batch(range(30, 40))
                    http.post(f"{V1}/runs/{run_id}/metrics", json=body).raise_for_status()
                    finish = {"status": "succeeded"}
                    http.post(f"{V1}/runs/{run_id}/finish", json=finish).raise_for_status()

    assert end == {"run_id": run_id, "status": "succeeded"}
    keys = [(m, s) for m, s, _ in received]
    assert len(keys) == len(set(keys)) == 80, "every point once"
    assert sorted(keys) == sorted((m, s) for s in range(40) for m in ("loss", "acc"))
    assert statuses[0] == "running" and statuses[-1] == "succeeded"


def test_stream_of_an_unknown_run_or_bad_event_id_is_a_problem(server: str) -> None:
    with httpx.Client(base_url=server) as http:
        missing = http.get(f"{V1}/runs/999999/metrics/stream")
        assert missing.status_code == 404
        assert missing.headers["content-type"].startswith("application/problem+json")
        run_id = http.post(f"{V1}/runs", json={"config": {}, "external": True}).json()["id"]
        bad = http.get(f"{V1}/runs/{run_id}/metrics/stream", headers={"Last-Event-ID": "x"})
        assert bad.status_code == 422, bad.text
        bad = http.get(f"{V1}/sweeps/999999/stream")
        assert bad.status_code == 404


def test_sweep_stream_delivers_every_runs_points_once_across_reconnects(
    server: str, db_url: str
) -> None:
    spec = {"base": {"data": {"n": 8, "d": 4}, "steps": 5}, "grid": {"seed": [0, 1, 2]}}
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)

    def dispatcher_writes(run_id: int, steps: range, finish: str | None = None) -> None:
        with session_scope(sessions) as db:
            transition(db_session=db, run_id=run_id, expected="queued", new="running")
            write_points(db_session=db, run_id=run_id, points=[("loss", s, 1.0) for s in steps])
            if finish:
                transition(db_session=db, run_id=run_id, expected="running", new=finish)

    with httpx.Client(base_url=server) as http:
        created = http.post(f"{V1}/sweeps", json=spec).json()
        a, b, c = created["run_ids"]
        dispatcher_writes(a, range(0, 50))
        url = f"{V1}/sweeps/{created['id']}/stream"
        received: list[tuple[int, int]] = []
        last_id = None
        with http.stream("GET", url) as response:
            first_statuses = {}
            for event in events(response):
                if event.event == "status":
                    first_statuses[event.json()["run_id"]] = event.json()["status"]
                if event.event == "metrics":
                    received += [(event.json()["run_id"], s) for _, s, _ in points_of(event)]
                    last_id = event.id
                    break
        assert first_statuses == {a: "running", b: "queued", c: "queued"}

        with session_scope(sessions) as db:
            write_points(db_session=db, run_id=a, points=[("loss", s, 2.0) for s in range(50, 80)])
            transition(db_session=db, run_id=a, expected="running", new="succeeded")
        dispatcher_writes(b, range(0, 30), finish="diverged")
        dispatcher_writes(c, range(0, 10))

        end = None
        with http.stream("GET", url, headers={"Last-Event-ID": last_id or ""}) as response:
            for event in events(response):
                if event.event == "metrics":
                    received += [(event.json()["run_id"], s) for _, s, _ in points_of(event)]
                    if (c, 9) in received and len(received) == 120:
                        with session_scope(sessions) as db:
                            write_points(db_session=db, run_id=c, points=[("loss", 10, 0.0)])
                            transition(db_session=db, run_id=c, expected="running", new="failed")
                elif event.event == "end":
                    end = event.json()
                    break
    engine.dispose()
    assert end == {
        "sweep_id": created["id"],
        "status_counts": {"succeeded": 1, "diverged": 1, "failed": 1},
    }
    want = [(a, s) for s in range(80)] + [(b, s) for s in range(30)] + [(c, s) for s in range(11)]
    assert sorted(received) == sorted(want) and len(received) == len(set(received))


def test_every_subscriber_of_a_live_sweep_gets_every_point_while_writers_race(
    server: str, db_url: str
) -> None:
    """25 subscribers (joining at different times, so most catch up behind the shared feed)
    and 3 concurrent writers, each batch all metrics of a few steps, as the dispatcher's."""
    spec = {"base": {"data": {"n": 8, "d": 4}, "steps": 5}, "grid": {"seed": [0, 1, 2]}}
    engine = make_engine(db_url)
    sessions = make_sessionmaker(engine)
    metrics = ("loss", "acc", "ntk_lambda_min")
    with httpx.Client(base_url=server) as http:
        created = http.post(f"{V1}/sweeps", json=spec).json()
    for run_id in created["run_ids"]:
        with session_scope(sessions) as db:
            transition(db_session=db, run_id=run_id, expected="queued", new="running")
    url = f"{server}{V1}/sweeps/{created['id']}/stream"
    received: dict[int, list[tuple[int, str, int]]] = {}
    ended: dict[int, Any] = {}

    def subscribe(index: int) -> None:
        time.sleep(index * 0.03)
        got = received.setdefault(index, [])
        with httpx.Client(timeout=60) as http, http.stream("GET", url) as response:
            for event in events(response):
                if event.event == "metrics":
                    run_id = event.json()["run_id"]
                    got += [(run_id, m, s) for m, s, _ in points_of(event)]
                elif event.event == "end":
                    ended[index] = event.json()
                    return

    def write(run_id: int) -> None:
        for first in range(0, 300, 7):
            points = [(m, s, s / 3) for s in range(first, first + 7) for m in metrics]
            with session_scope(sessions) as db:
                write_points(db_session=db, run_id=run_id, points=points)
            time.sleep(0.005)
        with session_scope(sessions) as db:
            transition(db_session=db, run_id=run_id, expected="running", new="succeeded")

    subscribers = [threading.Thread(target=subscribe, args=(i,)) for i in range(25)]
    writers = [threading.Thread(target=write, args=(r,)) for r in created["run_ids"]]
    for thread in subscribers + writers:
        thread.start()
    for thread in subscribers + writers:
        thread.join(120)
    engine.dispose()
    want = sorted((r, m, s) for r in created["run_ids"] for m in metrics for s in range(301))
    assert len(ended) == 25
    for index, got in received.items():
        assert sorted(got) == want and len(got) == len(set(got)), f"subscriber {index}"
