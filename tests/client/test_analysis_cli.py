"""The client's DataFrames, analyses, plots, exports and streams, and the ``analyze``, ``plot``
and ``export`` commands, against a live server holding a finished synthetic width sweep."""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.main import create_app
from overparam.cli import app
from overparam.client import MetricPoints, OverparamClient, OverparamError, parse_sse
from overparam.tables import number
from tests.analysis.synthetic import SEEDS, WIDTHS, Store, create_sweep, fill_width_sweep
from tests.conftest import make_settings
from worker.metric_names import LAMBDA_MIN, LOSS

RUNS = len(WIDTHS) * len(SEEDS)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, migrated_sqlite: Callable[[Path], str]
) -> Iterator[str]:
    from tests.analysis.synthetic import live_server

    url = migrated_sqlite(tmp_path_factory.mktemp("cli") / "cli.db")
    application = create_app(make_settings(url))
    store = Store(url)
    with live_server(application) as base, TestClient(application) as api:
        _, runs = create_sweep(api)
        fill_width_sweep(store, runs)
        store.write(runs[0]["id"], [("custom", 0, math.nan), ("custom", 1, math.inf)])
        yield base
    store.close()


def invoke(*args: str, code: int = 0) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "240"})
    assert result.exit_code == code, result.output
    return result.output


def test_metric_points_iterate_like_before_and_become_dataframes(server: str) -> None:
    with OverparamClient(server) as client:
        points = client.metrics(1, names=[LOSS, "custom"], page_size=50)
        assert isinstance(points, MetricPoints)
        first = list(points)
        assert first == list(points), "iterating again fetches the same points"
        assert next(points) == first[0] and next(points) == first[1]
        assert {"metric": "custom", "step": 0, "value": "NaN"} in first
        frame = points.to_pandas()
        assert list(frame.columns) == ["metric", "step", "value"] and len(frame) == len(first)
        custom = frame[frame.metric == "custom"].value.tolist()
        assert math.isnan(custom[0]) and custom[1] == math.inf
        wide = client.metrics_frame(1, names=[LOSS, LAMBDA_MIN], wide=True)
        assert list(wide.columns) == [LOSS, LAMBDA_MIN] and len(wide) == 201
        assert math.isnan(wide.loc[1, LAMBDA_MIN]) and wide.loc[10, LAMBDA_MIN] > 0
        sweep = client.sweep_metrics(1, names=[LAMBDA_MIN]).to_pandas()
        assert list(sweep.columns) == ["run_id", "metric", "step", "value"]
        assert sweep.run_id.nunique() == RUNS
        fits = client.fits_frame(1)
        assert {"slope", "ci_low", "ci_high", "n_points"} <= set(fits.columns)


def test_streams_of_a_finished_run_end(server: str) -> None:
    with OverparamClient(server) as client:
        events = list(client.stream_run(2, names=[LAMBDA_MIN]))
    assert events[0].event == "status" and events[-1].event == "end"
    steps = [p["step"] for e in events if e.event == "metrics" for p in e.data["points"]]
    assert steps == list(range(0, 201, 10))


def test_parse_sse() -> None:
    lines = ["retry: 2000", "", ": ping", "id: 7", "event: metrics", 'data: {"a":', "data: 1}", ""]
    (event,) = parse_sse(lines)
    assert (event.event, event.id, event.data) == ("metrics", "7", {"a": 1})


def test_analyze_prints_the_tables(server: str) -> None:
    out = invoke("analyze", "1", "--url", server)
    assert "scaling laws" in out and "neuron_dist_max/layer1" in out and "width=1024" in out
    assert "smallest width where all runs did: 64" in out
    analysis = json.loads(invoke("analyze", "1", "--json", "--url", server))
    fit = next(f for f in analysis["fits"] if f["y"] == "pattern_flips/layer1")
    assert number(fit["slope"]) in out


def test_plot_writes_a_png(server: str, tmp_path: Path) -> None:
    out = tmp_path / "scaling.png"
    assert "wrote" in invoke("plot", "1", "scaling", "-o", str(out), "--url", server)
    assert out.read_bytes()[:4] == b"\x89PNG"
    error = invoke("plot", "1", "pie", "-o", str(out), "--url", server, code=1)
    assert "422" in error
    with OverparamClient(server) as client:
        assert client.run_plot(1, "lambda_min")[:4] == b"\x89PNG"
        with pytest.raises(OverparamError) as exc:
            client.plot(99, "loss")
        assert exc.value.status == 404


def test_export_csv_and_parquet(server: str, tmp_path: Path) -> None:
    target = tmp_path / "sweep.csv"
    invoke("export", "--sweep", "1", "--name", LAMBDA_MIN, "-o", str(target), "--url", server)
    rows = list(csv.reader(io.StringIO(target.read_text())))
    assert rows[0] == ["run_id", "metric", "step", "value"] and len(rows) == 1 + RUNS * 21
    pytest.importorskip("pyarrow")
    pandas = pytest.importorskip("pandas")
    parquet = tmp_path / "run.parquet"
    assert "parquet" in invoke("export", "--run", "1", "-o", str(parquet), "--url", server)
    frame = pandas.read_parquet(parquet)
    assert set(frame.metric) >= {LOSS, LAMBDA_MIN, "custom"}
    invoke("export", "-o", str(parquet), "--url", server, code=1)
    invoke("export", "--run", "999", "-o", str(tmp_path / "x.csv"), "--url", server, code=1)
    assert not (tmp_path / "x.csv").exists()
