"""The dashboard in headless Chromium (Chrome DevTools Protocol): a finished sweep's charts and
analysis, then a running sweep whose charts and run table follow the SSE stream as points are
written. Screenshots are saved (path printed in the test log; ``OVERPARAM_TEST_ARTIFACTS``
chooses the folder) and checked not to be blank. Skips when Chromium is not installed."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from matplotlib import image

from api.main import create_app
from services.migrate import upgrade
from tests.analysis.synthetic import (
    SPEC,
    Store,
    create_sweep,
    fill_width_sweep,
    live_server,
    run_points,
)
from tests.conftest import make_settings
from tests.dashboard.browser import Browser, chromium_path
from worker.metric_names import LAMBDA_MIN, LOSS

INK = """(() => {
  const canvas = document.querySelector('%s canvas');
  if (!canvas) return 0;
  const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    if (d[i + 3] > 0 && Math.min(d[i], d[i + 1], d[i + 2]) < 200) n++;
  }
  return n;
})()"""


def test_the_page_and_its_assets_are_served(client: TestClient) -> None:
    page = client.get("/dashboard")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert f'data-loss-metric="{LOSS}"' in page.text
    assert f'data-lambda-metric="{LAMBDA_MIN}"' in page.text
    assert client.get("/", follow_redirects=False).headers["location"] == "/dashboard"
    for asset in (
        "dashboard.js",
        "dashboard.css",
        "vendor/uPlot.iife.min.js",
        "vendor/uPlot.LICENSE",
    ):
        assert client.get(f"/static/{asset}").status_code == 200, asset


@pytest.fixture
def artifacts(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("OVERPARAM_TEST_ARTIFACTS", tmp_path))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture
def browser() -> Iterator[Browser]:
    executable = chromium_path()
    if executable is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    b = Browser(executable)
    yield b
    b.close()


def save_screenshot(browser: Browser, path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = browser.screenshot(path)
    with capsys.disabled():
        print(f"\ndashboard screenshot: {path}")
    pixels = image.imread(io.BytesIO(data), format="png")[..., :3]
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800
    assert float(np.var(pixels)) > 0.005, "the screenshot is blank"


def test_dashboard_shows_a_finished_sweep_and_follows_a_running_one(
    browser: Browser, artifacts: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db_url = f"sqlite:///{tmp_path / 'dashboard.db'}"  # one backend is enough for the browser
    upgrade(db_url)
    app = create_app(make_settings(db_url, stream_poll_s=0.05))
    store = Store(db_url)
    try:
        with live_server(app) as url, TestClient(app) as api:
            finished, runs = create_sweep(api)
            fill_width_sweep(store, runs)
            live_spec = SPEC | {"name": "live", "grid": {"width": [64, 256], "seed": [0]}}
            live, (first, second) = create_sweep(api, live_spec)
            store.move(first["id"], "queued", "running")
            store.write(first["id"], run_points(64, 0, upto=60))

            browser.goto(f"{url}/dashboard#sweep={finished}")
            browser.wait_for(
                "document.querySelectorAll('#fits tbody tr').length > 0"
                " && document.getElementById('plot-scaling').naturalWidth > 0"
                " && Number(document.getElementById('chart-loss').dataset.points) > 0"
            )
            assert browser.evaluate(INK % "#chart-loss") > 500, "the loss chart is empty"
            assert browser.evaluate(INK % "#chart-lambda") > 500, "the λ_min chart is empty"
            slope = next(
                f["slope"]
                for f in api.get(f"/api/v1/sweeps/{finished}/analysis").json()["fits"]
                if f["y"] == "neuron_dist_max/layer1"
            )
            row = browser.evaluate(
                "document.querySelector('#fits tr[data-y=\"neuron_dist_max/layer1\"] .slope')"
                ".textContent"
            )
            assert row == f"{slope:.3f}"
            assert browser.evaluate("document.getElementById('live').textContent") == "finished"
            save_screenshot(browser, artifacts / "dashboard-finished.png", capsys)

            browser.goto(f"{url}/dashboard#sweep={live}")
            browser.wait_for("document.getElementById('live').textContent === 'live'")
            step = "document.querySelector('#runs tr[data-run-id=\"%d\"]').dataset.%s"
            browser.wait_for(f"{step % (first['id'], 'step')} === '60'")
            points = int(browser.evaluate("document.getElementById('chart-loss').dataset.points"))
            store.write(first["id"], run_points(64, 0, upto=120, start=61))
            browser.wait_for(f"{step % (first['id'], 'step')} === '120'")
            browser.wait_for(
                f"Number(document.getElementById('chart-loss').dataset.points) >= {points + 60}"
            )
            assert browser.evaluate("window.overparamDashboard.updates") >= 2

            store.move(second["id"], "queued", "running")
            store.write(second["id"], run_points(256, 0, upto=30))
            browser.wait_for(f"{step % (second['id'], 'status')} === 'running'")
            browser.wait_for(f"{step % (second['id'], 'step')} === '30'")
            save_screenshot(browser, artifacts / "dashboard-live.png", capsys)

            store.move(first["id"], "running", "succeeded")
            store.move(second["id"], "running", "diverged")
            browser.wait_for("document.getElementById('live').textContent === 'finished'")
            assert browser.evaluate(step % (second["id"], "status")) == "diverged"
            assert not [line for line in browser.console if "Error" in line], browser.console
    finally:
        store.close()
