"""``overparam watch``: the progress bars fold stream events correctly, and the command shows
live progress in a pseudo-terminal while a synthetic sweep's points are being written."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from rich.console import Console

from api.main import create_app
from overparam import watch
from overparam.client import ServerEvent
from tests.analysis.synthetic import SPEC, Store, create_sweep, live_server, run_points
from tests.client.terminal import CLI, Terminal
from tests.conftest import make_settings
from worker import metric_names


def test_the_streamed_names_are_the_workers() -> None:
    assert (watch.LOSS, watch.LAMBDA_MIN) == (metric_names.LOSS, metric_names.LAMBDA_MIN)


def render(progress: watch.Progress) -> str:
    console = Console(file=io.StringIO(), width=200, record=True)
    console.print(progress.make_tasks_table(progress.tasks))
    return console.export_text()


def test_events_move_the_bars() -> None:
    progress = watch.make_progress(Console(file=io.StringIO()))
    runs = [
        {"id": 1, "status": "running", "overrides": {"width": 64}, "config": {"steps": 200}},
        {"id": 2, "status": "queued", "overrides": {"width": 256}, "config": {"steps": 200}},
    ]
    bars = watch.SweepWatch(runs, progress)
    points = [{"metric": "loss", "step": k, "value": 2.0**-k} for k in range(0, 151, 50)] + [
        {"metric": "ntk_lambda_min", "step": 150, "value": 0.0625}
    ]
    assert not bars.apply(ServerEvent("metrics", {"run_id": 1, "points": points}, "150"))
    text = render(progress)
    assert "run 1 width=64" in text and "150/200" in text
    assert "7.01e-46" in text and "0.0625" in text and "running" in text
    assert not bars.apply(ServerEvent("status", {"run_id": 2, "status": "running"}, None))
    nan = [{"metric": "loss", "step": 3, "value": "NaN"}]
    assert not bars.apply(ServerEvent("metrics", {"run_id": 2, "points": nan}, "3"))
    assert not bars.apply(ServerEvent("status", {"run_id": 2, "status": "diverged"}, None))
    assert not bars.apply(ServerEvent("status", {"run_id": 1, "status": "succeeded"}, None))
    text = render(progress)
    assert "150/150" in text, "a run stopped early by its threshold is complete"
    assert "3/200" in text and "nan" in text and "diverged" in text
    assert bars.apply(ServerEvent("end", {"sweep_id": 1, "status_counts": {}}, None))
    assert bars.status_counts() == {"succeeded": 1, "diverged": 1}


@pytest.fixture
def service(
    tmp_path: Path, migrated_sqlite: Callable[[Path], str]
) -> Iterator[tuple[str, TestClient, Store]]:
    url = migrated_sqlite(tmp_path / "watch.db")
    app = create_app(make_settings(url, stream_poll_s=0.05))
    store = Store(url)
    with live_server(app) as base, TestClient(app) as api:
        yield base, api, store
    store.close()


def test_watch_shows_live_progress_in_a_terminal(service: tuple[str, TestClient, Store]) -> None:
    base, api, store = service
    spec = SPEC | {"grid": {"width": [64, 256], "seed": [0]}}
    sweep_id, (first, second) = create_sweep(api, spec)
    store.move(first["id"], "queued", "running")
    store.write(first["id"], run_points(64, 0, upto=60))
    terminal = Terminal(*CLI, "watch", str(sweep_id), "--url", base)
    try:
        terminal.expect("60/200")
        terminal.expect("running")
        store.write(first["id"], run_points(64, 0, upto=140, start=61))
        terminal.expect("140/200")
        store.move(second["id"], "queued", "running")
        store.write(second["id"], run_points(256, 0, upto=30))
        terminal.expect("30/200")
        store.write(first["id"], run_points(64, 0, upto=200, start=141))
        store.write(second["id"], run_points(256, 0, upto=200, start=31))
        store.move(first["id"], "running", "succeeded")
        store.move(second["id"], "running", "succeeded")
        terminal.expect("2 succeeded")
    finally:
        code = terminal.close()
    assert code == 0, terminal.text[-3000:]
    final = terminal.text[terminal.text.rindex(f"run {first['id']} width=64") :]
    assert "200/200" in final and "succeeded" in final
