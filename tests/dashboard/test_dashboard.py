"""The dashboard in headless Chromium (Chrome DevTools Protocol): a finished sweep's charts and
analysis, then a running sweep whose charts and run table follow the SSE stream as points are
written. Screenshots are saved (path printed in the test log; ``OVERPARAM_TEST_ARTIFACTS``
chooses the folder) and checked not to be blank. Skips when Chromium is not installed."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from matplotlib import image

from api.main import create_app
from overparam.tables import number
from services.db import make_engine, make_sessionmaker, session_scope
from services.quantities import label
from services.users import create_user
from tests.analysis.synthetic import (
    SPEC,
    STEPS,
    Store,
    create_sweep,
    fill_width_sweep,
    live_server,
    run_points,
)
from tests.conftest import make_settings
from tests.dashboard.browser import Browser, chromium_path
from worker.metric_names import (
    LAMBDA0,
    LAMBDA_MAX,
    LAMBDA_MIN,
    LOSS,
    NTK_CHANGE,
    PREDICTED_LOSS,
)
from worker.metrics import LayerDistance, Point

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


def save_screenshot(
    browser: Browser, path: Path, capsys: pytest.CaptureFixture[str], full_page: bool = False
) -> None:
    data = browser.screenshot(path, full_page)
    with capsys.disabled():
        print(f"\ndashboard screenshot: {path}")
    pixels = image.imread(io.BytesIO(data), format="png")[..., :3]
    assert pixels.shape[0] > 500 and pixels.shape[1] > 800
    assert float(np.var(pixels)) > 0.005, "the screenshot is blank"


def test_dashboard_shows_a_finished_sweep_and_follows_a_running_one(
    browser: Browser,
    artifacts: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    migrated_sqlite: Callable[[Path], str],
) -> None:
    db_url = migrated_sqlite(tmp_path / "dashboard.db")  # one backend is enough for the browser
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
            assert row == number(slope)
            assert browser.evaluate("document.getElementById('live').textContent") == "finished"
            save_screenshot(browser, artifacts / "dashboard-finished.png", capsys, full_page=True)

            browser.goto(f"{url}/dashboard#sweep={live}")
            browser.wait_for("document.getElementById('live').textContent === 'live'")
            step = "document.querySelector('#runs tr[data-run-id=\"%d\"]').dataset.%s"
            browser.wait_for(f"{step % (first['id'], 'step')} === '60'")
            browser.wait_for("window.overparamDashboard.updates >= 1")  # the stream is on
            points = int(browser.evaluate("document.getElementById('chart-loss').dataset.points"))
            store.write(first["id"], run_points(64, 0, upto=120, start=61))
            browser.wait_for(f"{step % (first['id'], 'step')} === '120'")
            browser.wait_for(
                f"Number(document.getElementById('chart-loss').dataset.points) >= {points + 60}"
            )
            assert browser.evaluate("window.overparamDashboard.updates") >= 2
            theory = f"run {first['id']} theory"
            browser.wait_for(f"figures.loss.chart.plot.series.some(s => s.label === '{theory}')")
            pending = "[...document.querySelectorAll('#groups tbody tr')].map(r => r.className)"
            assert browser.evaluate(pending) == ["partial", "partial"], "no group is final yet"

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


COLOURED = """(() => {
  const canvas = document.querySelector('%s canvas');
  if (!canvas) return 0;
  const d = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4) {
    const spread = Math.max(d[i], d[i + 1], d[i + 2]) - Math.min(d[i], d[i + 1], d[i + 2]);
    if (d[i + 3] > 200 && spread > 60) n++;
  }
  return n;
})()"""  # pixels of a series' colour: not the grey axes, grid or labels
TINY = 0.7  # L(k) = 8·0.7^k: 8.9e-31 at k = 200
TINY_SPEC: dict[str, Any] = {
    "name": "to-the-float-floor",
    "base": {
        "arch": "fc",
        "depth": 2,
        "activation": "softplus",
        "data": {"n": 16, "d": 4},
        "steps": STEPS,
        "lr": 0.5,
    },
    "grid": {"width": [64, 256], "seed": [0]},
}


def tiny_loss_run() -> list[Point]:
    """A deep run whose loss falls to 8.9e-31, its linearized prediction to 5e-33, with a
    catapult (η·λ_max(H(k)) = 2.2 from step 100), a moving kernel and three layers."""
    points: list[Point] = [(LAMBDA0, 0, 0.05)]
    for k in range(STEPS + 1):
        points.append((LOSS, k, 8.0 * TINY**k))
        if k % 10:
            continue
        progress = k / STEPS
        points += [
            (PREDICTED_LOSS, k, 8.0 * 0.69**k),
            (LAMBDA_MIN, k, 0.1 * (1 - 0.3 * progress)),
            (LAMBDA_MAX, k, 4.4 if k >= 100 else 3.0),
            (NTK_CHANGE, k, 0.3 * progress),
        ]
        for i, layer in enumerate(("layer1", "layer2", "out")):
            scale = progress * 10.0**-i
            points += LayerDistance(3 * scale, scale, 0.1 * scale, 0.5 * scale).points(layer, k)
    return points


def test_a_loss_at_1e_30_is_drawn_and_a_run_page_shows_everything(
    browser: Browser,
    artifacts: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    migrated_sqlite: Callable[[Path], str],
) -> None:
    db_url = migrated_sqlite(tmp_path / "tiny.db")
    app = create_app(make_settings(db_url, stream_poll_s=0.05))
    store = Store(db_url)
    try:
        with live_server(app) as url, TestClient(app) as api:
            sweep, (done, waiting) = create_sweep(api, TINY_SPEC)
            store.finish(done["id"], tiny_loss_run())
            store.move(waiting["id"], "queued", "running")
            external = api.post("/api/v1/runs", json={"config": {"lr": 0.01}, "external": True})
            external_id = external.json()["id"]
            store.write(external_id, [(LOSS, k, 2.0**-k) for k in range(50)])

            browser.goto(f"{url}/dashboard#sweep={sweep}")
            browser.wait_for("window.overparamDashboard && overparamDashboard.sweepId !== null")
            browser.wait_for("Number(document.getElementById('chart-loss').dataset.points) > 0")
            browser.wait_for(f"{COLOURED % '#chart-loss'} > 500")  # blank before the fix
            assert not [line for line in browser.console if "Error" in line], browser.console
            ticks = browser.evaluate(
                "(() => { const [lo, hi] = logRange(null, 8.9e-31, 8);"
                " return tickLabels(null, logSplits(null, 1, lo, hi)); })()"
            )
            assert "1e-30" in ticks and len(ticks) <= 7 and len(set(ticks)) == len(ticks)
            narrow = browser.evaluate(
                "(() => { const [lo, hi] = logRange(null, 0.1003, 0.1061);"
                " return tickLabels(null, logSplits(null, 1, lo, hi)); })()"
            )
            assert len(narrow) >= 2 and len(set(narrow)) == len(narrow), narrow
            series = browser.evaluate("figures.loss.chart.plot.series.map(s => s.label)")
            assert f"run {done['id']} theory" in series, "the theory curve is on the loss chart"
            legend = browser.evaluate(
                "[...document.querySelectorAll('#fig-loss .legend-entry')].map(e => e.textContent)"
            )
            assert legend == ["width = 64", "width = 256", label(PREDICTED_LOSS)]
            fill = (
                "document.querySelector('#chart-loss canvas').getBoundingClientRect().width"
                " / document.getElementById('chart-loss').clientWidth"
            )
            assert browser.evaluate(fill) > 0.95, "the chart fills its column"
            wide = browser.evaluate("document.getElementById('chart-loss').clientWidth")
            viewport = {"width": 900, "height": 1100, "deviceScaleFactor": 1, "mobile": False}
            browser.call("Emulation.setDeviceMetricsOverride", **viewport)
            browser.wait_for(f"document.getElementById('chart-loss').clientWidth > {wide}")
            browser.wait_for(f"{fill} > 0.95")  # one column, and the chart followed it
            browser.call("Emulation.clearDeviceMetricsOverride")
            browser.wait_for(
                f"!!document.querySelector('#external li[data-run-id=\"{external_id}\"]')"
            )
            browser.wait_for("document.querySelectorAll('#groups tbody tr.partial').length === 1")

            browser.goto(f"{url}/dashboard#run={done['id']}")
            browser.wait_for("window.overparamRun && overparamRun.id !== null")
            browser.wait_for("!!document.querySelector('#run-flags [data-flag=edge_of_stability]')")
            browser.wait_for(f"{COLOURED % '#chart-run-loss'} > 300")
            browser.wait_for(f"{COLOURED % '#chart-run-movement'} > 300")
            layers = browser.evaluate(
                "document.querySelectorAll('#fig-run-movement .legend-entry').length"
            )
            assert layers == 3
            names = api.get(f"/api/v1/runs/{done['id']}/metric-names").json()["count"]
            browser.wait_for(
                f"document.querySelectorAll('#run-metrics tbody tr').length === {names}"
            )
            browser.wait_for("document.querySelectorAll('#run-layers tbody tr').length === 3")
            check = "document.querySelector('#run-analysis tr[data-check=step_size_stable]')"
            assert "violated" in browser.evaluate(f"{check}.textContent")
            assert '"width": 64' in browser.evaluate(
                "document.getElementById('run-config').textContent"
            )
            assert browser.evaluate("document.getElementById('run-manifest').textContent")
            browser.evaluate(
                "(() => { const s = document.querySelector('#fig-run-chooser select');"
                f" s.value = '{NTK_CHANGE}'; s.dispatchEvent(new Event('change')); }})()"
            )
            browser.wait_for(f"{COLOURED % '#chart-run-chooser'} > 200")
            browser.evaluate("document.querySelector('#fig-run-lambda .scale-switch').click()")
            browser.wait_for(
                "document.querySelector('#fig-run-lambda .scale-switch').dataset.scale === 'linear'"
            )
            browser.wait_for(f"{COLOURED % '#chart-run-lambda'} > 200")
            assert browser.evaluate("document.getElementById('cancel').hidden")
            save_screenshot(browser, artifacts / "dashboard-run.png", capsys, full_page=True)

            browser.goto(f"{url}/dashboard#run={waiting['id']}")
            browser.wait_for(f"window.overparamRun && overparamRun.run?.id === {waiting['id']}")
            browser.wait_for("!document.getElementById('cancel').hidden")
            browser.evaluate("document.getElementById('cancel').click()")
            browser.wait_for(
                "document.getElementById('run-status').textContent === 'running, cancel requested'"
            )
            assert api.get(f"/api/v1/runs/{waiting['id']}").json()["cancel_requested"]

            browser.goto(f"{url}/dashboard#run={external_id}")
            browser.wait_for(f"window.overparamRun && overparamRun.run?.id === {external_id}")
            browser.wait_for(
                "document.getElementById('run-title').textContent.includes('external')"
            )
            browser.wait_for(f"{COLOURED % '#chart-run-loss'} > 200")
            assert not [line for line in browser.console if "Error" in line], browser.console
    finally:
        store.close()


def test_a_lab_dashboard_asks_for_a_token_and_filters_by_owner(
    browser: Browser, tmp_path: Path, migrated_sqlite: Callable[[Path], str]
) -> None:
    """With tokens required, the page shows a sign-in form; a token keeps the session in a
    cookie that the lists and the event stream use; the owner filter shows one user's sweeps."""
    db_url = migrated_sqlite(tmp_path / "lab.db")
    engine = make_engine(db_url)
    with session_scope(make_sessionmaker(engine)) as db:
        create_user(db_session=db, name="head", role="admin")  # a lab service needs an admin
        tokens = {n: create_user(db_session=db, name=n, role="member")[1] for n in ("ann", "ben")}
    engine.dispose()
    settings = make_settings(
        db_url, auth="required", allowed_hosts=["127.0.0.1"], stream_poll_s=0.05
    )
    app = create_app(settings)
    with live_server(app) as url, TestClient(app, base_url="http://127.0.0.1") as api:
        sweeps = {}
        for name, token in tokens.items():
            api.headers["authorization"] = f"Bearer {token}"
            sweeps[name] = create_sweep(api, SPEC | {"name": f"{name}'s sweep"})[0]
        browser.goto(f"{url}/dashboard")
        browser.wait_for("document.getElementById('login')?.hidden === false")
        assert (
            browser.evaluate("document.querySelectorAll('#sweeps li[data-sweep-id]').length") == 0
        )
        browser.evaluate(
            "(() => { const f = document.getElementById('login');"
            " f.querySelector('input').value = 'ovp_wrong'; f.requestSubmit(); })()"
        )
        browser.wait_for("document.querySelector('#login .error').textContent.includes('refused')")
        browser.evaluate(
            "(() => { const f = document.getElementById('login');"
            f" f.querySelector('input').value = '{tokens['ann']}'; f.requestSubmit(); }})()"
        )
        browser.wait_for("document.querySelectorAll('#sweeps li[data-sweep-id]').length === 2")
        assert browser.evaluate("document.getElementById('login').hidden")
        cookie = browser.evaluate("document.cookie")
        assert tokens["ann"] not in cookie, "the session cookie is HttpOnly"
        owners = browser.evaluate(
            "[...document.querySelectorAll('#owner-filter option')].map(o => o.value)"
        )
        assert sorted(owners) == ["", "ann", "ben"]
        browser.evaluate(
            "(() => { const s = document.getElementById('owner-filter');"
            " s.value = 'ben'; s.dispatchEvent(new Event('change')); })()"
        )
        browser.wait_for("document.querySelectorAll('#sweeps li[data-sweep-id]').length === 1")
        shown = browser.evaluate(
            "document.querySelector('#sweeps li[data-sweep-id]').dataset.sweepId"
        )
        assert int(shown) == sweeps["ben"]
        browser.goto(f"{url}/dashboard#sweep={sweeps['ann']}")
        browser.wait_for(
            "['live', 'finished'].includes(document.getElementById('live').textContent)"
        )
        assert browser.evaluate("document.getElementById('login').hidden")
        assert not [line for line in browser.console if "Error" in line], browser.console
