"""The CLI against a real HTTP server (uvicorn in a thread, no dispatcher)."""

from __future__ import annotations

import contextlib
import csv
import io
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from typer.testing import CliRunner

from api.main import create_app
from overparam.cli import app
from services.db import make_engine, make_sessionmaker, session_scope
from services.metrics import write_points
from tests.conftest import make_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "quickstart.yaml"


@contextlib.contextmanager
def serving(application: Any) -> Iterator[str]:
    """``application`` under uvicorn in a thread on a free port; yields its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = uvicorn.Config(application, port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        srv.should_exit = True
        thread.join(10)


@pytest.fixture
def server(db_url: str) -> Iterator[str]:
    with serving(create_app(make_settings(db_url))) as url:
        yield url


WIDE = {"COLUMNS": "200"}


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), env=WIDE)
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
    assert rows[0] == ["run_id", "metric", "step", "value"]
    assert [(int(r[0]), r[1], int(r[2]), float(r[3])) for r in rows[1:]] == [
        (1, "loss", s, 2.0**-s) for s in range(5)
    ]
    assert "0.0625" in invoke("metrics", "1", "--url", server)


def test_metrics_csv_has_the_columns_and_rows_of_export(
    server: str, db_url: str, tmp_path: Path
) -> None:
    invoke("submit", str(EXAMPLE), "--url", server)
    points = [("loss", 0, 1.5), ("loss", 1, float("nan")), ("ntk_lambda_min", 0, 0.125)]
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        write_points(db_session=db, run_id=2, points=points)
    engine.dispose()
    exported = tmp_path / "run2.csv"
    invoke("export", "--run", "2", "-o", str(exported), "--url", server)
    printed = list(csv.reader(io.StringIO(invoke("metrics", "2", "--csv", "--url", server))))
    written = list(csv.reader(io.StringIO(exported.read_text())))
    assert printed[0] == written[0] == ["run_id", "metric", "step", "value"]
    assert sorted(printed[1:]) == sorted(written[1:]) and len(printed) == 4


def test_errors_are_readable_and_exit_nonzero(server: str, tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("grid:\n  width: [16, -1]\n")
    result = CliRunner().invoke(app, ["submit", str(bad), "--url", server])
    assert result.exit_code == 1
    assert "grid.width[1]" in result.output and "-1" in result.output
    result = CliRunner().invoke(app, ["run", "42", "--url", server])
    assert result.exit_code == 1 and "404" in result.output


def test_a_yaml_syntax_error_is_one_line_with_file_line_and_column(tmp_path: Path) -> None:
    bad = tmp_path / "broken.yaml"
    bad.write_text("name: x\ngrid:\n  width: [16, 32\n  seed: [0]\n")
    result = CliRunner().invoke(app, ["submit", str(bad), "--url", "http://127.0.0.1:9"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.output.strip().splitlines()
    assert line == f"error: {bad}:4:7: expected ',' or ']', but got ':'"


def test_unknown_fields_get_a_did_you_mean(server: str, tmp_path: Path) -> None:
    typo = tmp_path / "typo.yaml"
    typo.write_text("base:\n  widht: 64\ngird:\n  seed: [0]\n")
    result = CliRunner().invoke(app, ["submit", str(typo), "--url", server], env=WIDE)
    assert result.exit_code == 1
    assert "base.widht = 64: unknown run config field; did you mean 'width'?" in result.output
    assert "gird = {'seed': [0]}: unknown sweep spec field; did you mean 'grid'?" in result.output


def test_unreachable_service_is_a_clear_error() -> None:
    result = CliRunner().invoke(app, ["runs", "--url", "http://127.0.0.1:9"], env=WIDE)
    assert result.exit_code == 1
    assert "no overparam service answers at http://127.0.0.1:9" in result.output
    assert "overparam serve" in result.output and "OVERPARAM_URL" in result.output


def test_dry_run_shows_the_runs_and_submits_nothing(server: str) -> None:
    out = invoke("submit", str(EXAMPLE), "--dry-run", "--url", server)
    assert "9 runs are valid; nothing was submitted" in out
    assert "width=1024 seed=2" in out
    assert "no sweeps" not in out and invoke("sweeps", "--url", server).count("quickstart") == 0


def test_sweeps_cancel_and_a_run_plot(server: str, db_url: str, tmp_path: Path) -> None:
    invoke("submit", str(EXAMPLE), "--url", server)
    listing = invoke("sweeps", "--url", server)
    assert "quickstart" in listing and "9 queued" in listing
    assert "run 1: cancelled" in invoke("cancel", "1", "--url", server)
    result = CliRunner().invoke(app, ["cancel", "1", "--url", server], env=WIDE)
    assert result.exit_code == 1 and "409" in result.output
    out = invoke("cancel", "--sweep", "1", "--url", server)
    assert out.count("cancelled") == 8 and "run 1:" not in out
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        write_points(db_session=db, run_id=2, points=[("loss", s, 2.0**-s) for s in range(5)])
    engine.dispose()
    png = tmp_path / "run.png"
    assert "wrote" in invoke("plot", "--run", "2", "loss", "-o", str(png), "--url", server)
    assert png.read_bytes()[:4] == b"\x89PNG"
    result = CliRunner().invoke(app, ["plot", "loss", "-o", str(png), "--url", server], env=WIDE)
    assert result.exit_code == 2 and "overparam plot SWEEP KIND" in result.output


def test_serve_says_how_to_call_the_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """After bootstrap.py the script is in .venv/bin, not on the PATH: say where, and how."""
    import shutil
    import sys

    from overparam.cli import invocation

    script = Path(sys.executable).with_name("overparam")
    if not script.exists():
        pytest.skip("no overparam script next to this interpreter")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    command, hint = invocation()
    assert Path(command).resolve() == script.resolve() and shutil.which(command) is not None
    assert hint == f"`source {Path(command).parent / 'activate'}` puts overparam on your PATH"
    monkeypatch.setenv("PATH", f"{script.parent}:/usr/bin:/bin")
    assert invocation() == ("overparam", "")


def test_cli_import_is_light() -> None:
    """`overparam runs` must not pay for torch, Ray or the server stack at start-up."""
    import subprocess
    import sys

    code = (
        "import sys, overparam.cli; "
        "heavy = {'torch', 'ray', 'sqlalchemy', 'fastapi'} & set(sys.modules); "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_client_logs_an_external_run_like_a_training_script(server: str) -> None:
    """create_run / log_metrics / log_series / finish over real HTTP, then read back."""
    from overparam.client import OverparamClient, OverparamError

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


def test_a_lab_user_is_made_signs_in_once_and_the_cli_uses_the_token(
    db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``admin create-user`` prints a token once; without it the CLI is refused and says why;
    ``login`` checks it, keeps it readable by the user only, and later commands send it."""
    from services.settings import get_settings

    monkeypatch.setenv("OVERPARAM_DATABASE_URL", db_url)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.delenv("OVERPARAM_TOKEN", raising=False)
    get_settings.cache_clear()
    made = invoke("admin", "create-user", "ada", "--admin")
    token = next(w for w in made.split() if w.startswith("ovp_"))
    settings = make_settings(db_url, auth="required", allowed_hosts=["127.0.0.1"])
    with serving(create_app(settings)) as url:
        refused = CliRunner().invoke(app, ["sweeps", "--url", url], env=WIDE)
        assert refused.exit_code != 0 and "token" in refused.output, refused.output
        wrong = CliRunner().invoke(app, ["login", "--url", url, "--token", "ovp_wrong"], env=WIDE)
        assert wrong.exit_code != 0 and not (tmp_path / "overparam").exists(), wrong.output
        assert "as ada (admin)" in invoke("login", "--url", url, "--token", token)
        saved = tmp_path / "overparam" / "credentials.json"
        assert saved.stat().st_mode & 0o077 == 0, oct(saved.stat().st_mode)
        assert token in saved.read_text()
        assert "9 runs queued" in invoke("submit", str(EXAMPLE), "--url", url)
        assert "ada" in invoke("runs", "--sweep", "1", "--url", url)
        assert "ada" in invoke("sweeps", "--owner", "ada", "--url", url)
        assert "ada" not in invoke("runs", "--owner", "nobody", "--url", url)
    get_settings.cache_clear()


def test_serve_refuses_several_workers_with_the_embedded_dispatcher(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from services.settings import get_settings

    monkeypatch.setenv("OVERPARAM_EMBEDDED_DISPATCHER", "true")
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["serve", "--port", "1", "--workers", "2"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "OVERPARAM_EMBEDDED_DISPATCHER=false" in result.output


def test_the_workers_metrics_directory_starts_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An earlier service's counts are not added to this one's; nothing else is removed."""
    from overparam.cli import metrics_directory

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    default = metrics_directory(tmp_path)
    assert default == tmp_path / "prometheus" and default.is_dir()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "counter_123.db").write_bytes(b"old")
    (mine / "notes.txt").write_text("keep")
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(mine))
    assert metrics_directory(tmp_path) == mine
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
