"""``runs``, ``analyze`` and ``watch`` in an 80-column pseudo-terminal: no number is cut (no
"…" anywhere), no line is wider than the terminal, widths 1024 and 16384 stay apart, and
``watch`` keeps its bars and step counts. The sweep holds a run that converged to 7.99e-16, one
that diverged to 1.41e+15 past the edge of stability, and one still running."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from tests.analysis.synthetic import SPEC, STEPS, Store, create_sweep, live_server, run_points
from tests.client.terminal import CLI, Terminal, run_in_terminal
from tests.conftest import make_settings
from worker.metric_names import LAMBDA_MAX, LOSS

COLUMNS = 80
CONVERGED = 7.98703e-16
DIVERGED = 1.41315e15


def diverging(upto: int = STEPS) -> list[tuple[str, int, float]]:
    """A loss climbing from 8 to 1.41315e15 while η·λ_max(H(k)) = 3 (past the edge)."""
    points = [(LOSS, k, 8.0 * (DIVERGED / 8.0) ** (k / STEPS)) for k in range(upto + 1)]
    return points + [(LAMBDA_MAX, k, 6.0) for k in range(0, upto + 1, 10)]


@pytest.fixture
def sweep(
    tmp_path: Path, migrated_sqlite: Callable[[Path], str]
) -> Iterator[tuple[str, Store, list[dict[str, Any]]]]:
    url = migrated_sqlite(tmp_path / "narrow.db")
    app = create_app(make_settings(url, stream_poll_s=0.05))
    store = Store(url)
    spec = SPEC | {"grid": {"width": [256, 1024, 16384], "seed": [0, 1]}}
    with live_server(app) as base, TestClient(app) as api:
        _, runs = create_sweep(api, spec)
        *narrow, converged, other, diverged, running = runs
        for run in narrow:
            store.finish(run["id"], run_points(256, run["overrides"]["seed"]))
        summary = {"steps_done": STEPS, "lambda_min_initial": 0.0123456}
        store.finish(converged["id"], run_points(1024, 0))
        store.move(
            converged["id"], "succeeded", "succeeded", summary=summary | {"final_loss": CONVERGED}
        )
        store.finish(other["id"], run_points(1024, 1))
        store.finish(diverged["id"], diverging(), status="diverged")
        store.move(
            diverged["id"], "diverged", "diverged", summary=summary | {"final_loss": DIVERGED}
        )
        store.move(running["id"], "queued", "running")
        store.write(running["id"], run_points(16384, 1, upto=60))
        yield base, store, runs
    store.close()


def assert_fits(text: str) -> None:
    """Nothing cut, nothing wider than the terminal."""
    assert "…" not in text, text
    lines = [line for chunk in text.split("\n") for line in chunk.split("\r")]
    assert max(len(line.rstrip()) for line in lines) <= COLUMNS, text


def test_runs_at_80_columns(sweep: tuple[str, Store, list[dict[str, Any]]]) -> None:
    base, _, _ = sweep
    text = run_in_terminal(*CLI, "runs", "--url", base, columns=COLUMNS)
    assert_fits(text)
    assert "7.99e-16" in text and "1.41e+15" in text and "0.0123" in text
    assert re.search(r"width=1024\b", text) and "width=16384" in text


def test_analyze_at_80_columns(sweep: tuple[str, Store, list[dict[str, Any]]]) -> None:
    base, _, _ = sweep
    text = run_in_terminal(*CLI, "analyze", "1", "--url", base, columns=COLUMNS)
    assert_fits(text)
    assert "width=16384" in text and "neuron_dist_max/layer1" in text
    assert "edge_of_stability" in text and "crossed 2 at step 0" in text
    assert "1/2" in text, "the group with a running run says how many runs are final"


def test_watch_at_80_columns(sweep: tuple[str, Store, list[dict[str, Any]]]) -> None:
    base, store, runs = sweep
    running = runs[-1]["id"]
    terminal = Terminal(*CLI, "watch", "1", "--url", base, columns=COLUMNS)
    try:
        terminal.expect("60/200")
        store.write(running, run_points(16384, 1, upto=STEPS, start=61))
        store.move(running, "running", "succeeded")
        terminal.expect("1 diverged, 5 succeeded")
    finally:
        code = terminal.close()
    assert code == 1, "a diverged run makes watch exit 1"
    assert_fits(terminal.text)
    assert f"run {running}: width=16384 seed=1" in terminal.text, "parameters listed once"
    final = terminal.text[terminal.text.rindex(f"run {running} ") :]
    assert "━" in final and "200/200" in final and "1.41e+15" in terminal.text
