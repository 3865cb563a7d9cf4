"""The CLI against a real HTTP server (uvicorn in a thread, no dispatcher)."""

from __future__ import annotations

import csv
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn
from typer.testing import CliRunner

from api.main import create_app
from client.cli import app
from services.db import make_engine, make_sessionmaker, session_scope
from services.metrics import write_points
from tests.conftest import make_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


@pytest.fixture
def server(db_url: str) -> Iterator[str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(create_app(make_settings(db_url)), port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    return result.output


def test_submit_list_show_and_metrics(server: str, db_url: str) -> None:
    out = invoke("submit", str(EXAMPLE), "--url", server)
    assert "9 runs queued" in out
    listing = invoke("runs", "--sweep", "1", "--url", server)
    assert listing.count("queued") == 9 and "width=1024" in listing
    assert '"status": "queued"' in invoke("run", "1", "--url", server)

    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        write_points(db_session=db, run_id=1, points=[("loss", s, 2.0**-s) for s in range(5)])
    engine.dispose()
    rows = list(csv.reader(io.StringIO(invoke("metrics", "1", "--csv", "--url", server))))
    assert rows[0] == ["metric", "step", "value"]
    assert [(r[0], int(r[1]), float(r[2])) for r in rows[1:]] == [
        ("loss", s, 2.0**-s) for s in range(5)
    ]
    assert "0.0625" in invoke("metrics", "1", "--url", server)


def test_errors_are_readable_and_exit_nonzero(server: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  width: [16, -1]\n")
    result = CliRunner().invoke(app, ["submit", str(bad), "--url", server])
    assert result.exit_code == 1
    assert "grid.width[1]" in result.output and "-1" in result.output
    result = CliRunner().invoke(app, ["run", "42", "--url", server])
    assert result.exit_code == 1 and "404" in result.output


def test_unreachable_service_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["runs", "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "Unreachable" in result.output


def test_cli_import_is_light() -> None:
    """`overparam runs` must not pay for torch, Ray or the server stack at start-up."""
    import subprocess
    import sys

    code = (
        "import sys, client.cli; "
        "heavy = {'torch', 'ray', 'sqlalchemy', 'fastapi'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_logs_an_external_run_like_a_training_script(server: str) -> None:
    """create_run / log_metrics / log_series / finish over real HTTP, then read back."""
    from client.client import OverparamClient, OverparamError

    with OverparamClient(server) as client:
        run = client.create_run({"lr": 0.01, "layers": [64, 64]})
        assert run["status"] == "running" and run["external"] is True
        assert client.log_metrics(run["id"], {"loss": 1.5, "acc": 0.25}, step=0) == {
            "received": 2,
            "stored": 2,
        }
        steps = list(range(1, 101))
        values = [1.0 / s for s in steps]
        values[9] = float("nan")
        logged = client.log_series(
            run["id"], {"loss": (steps, values), "lr": ([0], [float("inf")])}
        )
        assert logged == {"received": 101, "stored": 101}
        assert client.log_series(run["id"], {"loss": (steps[:5], values[:5])})["stored"] == 0
        points = {(p["metric"], p["step"]): p["value"] for p in client.metrics(run["id"])}
        assert len(points) == 103 and points[("loss", 10)] == "NaN"
        assert points[("lr", 0)] == "Infinity" and points[("loss", 100)] == 0.01
        finished = client.finish(run["id"], summary={"best": 0.01})
        assert finished["status"] == "succeeded" and finished["summary"] == {"best": 0.01}
        with pytest.raises(OverparamError) as refused:
            client.log_metrics(run["id"], {"loss": 0.0}, step=101)
        assert refused.value.status == 409
