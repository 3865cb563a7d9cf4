"""The fc width-scaling example's 64-wide softplus run (seed 0), trained by the real worker
(in-process, no Ray; ~15 s on a CPU): its analysis flags the edge of stability (η·λ_max(H(k))
climbs from 1 to 2.6), a kernel that moved and a fitted rate ~17× the theory's, in the API
that the run page reads and in ``overparam analyze``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from api.main import create_app
from overparam.cli import app as cli
from tests.analysis.synthetic import Store, create_sweep, live_server
from tests.conftest import make_settings
from worker.config import RunConfig
from worker.events import MetricBatch
from worker.train import train

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fc_width_scaling.yaml"


def test_the_fc_examples_softplus_run_is_flagged(
    tmp_path: Path, migrated_sqlite: Callable[[Path], str]
) -> None:
    spec = yaml.safe_load(EXAMPLE.read_text())
    spec["grid"] = {"activation": ["softplus"], "width": [64], "seed": [0]}
    url = migrated_sqlite(tmp_path / "fc.db")
    application = create_app(make_settings(url))
    store = Store(url)
    try:
        with live_server(application) as base, TestClient(application) as api:
            sweep_id, (run,) = create_sweep(api, spec)
            config = RunConfig.model_validate(run["config"])
            points = [p for e in train(config) if isinstance(e, MetricBatch) for p in e.points]
            store.finish(run["id"], points)
            analysis = api.get(f"/api/v1/runs/{run['id']}/analysis").json()
            flags = {f["name"]: f for f in analysis["flags"]}
            assert set(flags) == {"edge_of_stability", "kernel_moved", "rate_vs_theory"}
            assert analysis["spectrum"]["eta_lambda_max_initial"] == pytest.approx(1.0)
            assert flags["edge_of_stability"]["value"] > 2.5
            assert flags["rate_vs_theory"]["value"] > 10
            checks = {c["name"]: c["ok"] for c in analysis["regime"]["checks"]}
            assert checks["step_size_stable"] is False
            printed = CliRunner().invoke(
                cli, ["analyze", str(sweep_id), "--url", base], env={"COLUMNS": "120"}
            )
            assert printed.exit_code == 0, printed.output
            assert "edge_of_stability" in printed.output and "rate_vs_theory" in printed.output
            assert f"crossed 2 at step {flags['edge_of_stability']['step']}" in printed.output
    finally:
        store.close()
