"""The external-run example of docs/guide.md runs as written (only the service's URL is
substituted) against a live service, and the λ_min it logs for its final model agrees with a
torch.func Jacobian of that model to 1e-8; the script's source is recorded (git commit only in
a repository)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from fastapi.testclient import TestClient  # noqa: E402
from torch.func import functional_call, jacrev, vmap  # noqa: E402

from api.main import create_app  # noqa: E402
from overparam.client import OverparamClient, script_source  # noqa: E402
from tests.analysis.synthetic import live_server  # noqa: E402
from tests.conftest import make_settings  # noqa: E402

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "guide.md"
MARKER = "<!-- example: external-run-ntk -->"
URL = "http://127.0.0.1:8000"


def example() -> str:
    found = re.search(re.escape(MARKER) + r"\n```python\n(.*?)\n```", GUIDE.read_text(), re.S)
    assert found, f"docs/guide.md has no python block after {MARKER}"
    assert URL in found.group(1)
    return found.group(1)


def jacobian_lambda_min(model: torch.nn.Module, X: torch.Tensor) -> float:
    """λ_min of J Jᵀ, J the (n, P) Jacobian of the one-output model by torch.func in float64."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}

    def f(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, p, (x[None],))[0, 0]

    per_param = vmap(jacrev(f), in_dims=(None, 0))(params, X.double())
    J = torch.cat([per_param[k].reshape(X.shape[0], -1) for k in params], dim=1)
    return float(torch.linalg.eigvalsh(J @ J.T)[0])


def test_the_guide_example_runs_and_logs_the_jacobian_lambda_min(db_url: str) -> None:
    code = example()
    namespace: dict[str, Any] = {"__name__": "__guide__"}
    with TestClient(create_app(make_settings(db_url))) as app, live_server(app.app) as url:  # type: ignore[arg-type]
        exec(compile(code.replace(URL, url), str(GUIDE), "exec"), namespace)
        with OverparamClient(url) as op:
            run = op.run(namespace["run"].id)
            points = {
                (p["metric"], p["step"]): p["value"]
                for p in op.metrics(run["id"], names=["ntk_lambda_min", "loss"])
            }
            sweep = op.sweep(run["sweep_id"])
    steps = namespace["params"]["steps"]
    logged = points[("ntk_lambda_min", steps)]
    expected = jacobian_lambda_min(namespace["model"], namespace["X"])
    assert expected > 0
    assert abs(logged - expected) <= 1e-8 * expected, (logged, expected)
    assert logged == namespace["lambda_min"]
    assert {s for m, s in points if m == "ntk_lambda_min"} == set(range(0, steps + 1, 10))
    assert {s for m, s in points if m == "loss"} == set(range(steps))
    assert points[("loss", steps - 1)] < points[("loss", 0)]
    assert (run["status"], run["name"], run["tags"]) == ("succeeded", "mlp-256", {"data": "sphere"})
    assert run["config"] == namespace["params"]
    assert run["manifest"]["client"]["torch"] == torch.__version__
    assert (sweep["kind"], sweep["name"], sweep["run_count"]) == ("experiment", "my-mlps", 1)


def test_the_source_names_the_scripts_commit_only_in_a_repository(tmp_path: Path) -> None:
    script = tmp_path / "repo" / "train.py"
    script.parent.mkdir()
    script.write_text("print('hi')\n")
    git = ["git", "-C", str(script.parent), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    outside = script_source(str(script))
    assert outside["script"] == str(script) and outside["python"]
    assert "git_commit" not in outside
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "train.py"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "train"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    inside = script_source(str(script))
    assert inside["git_commit"] == head and inside["git_dirty"] is False
    script.write_text("print('changed')\n")
    assert script_source(str(script))["git_dirty"] is True


def test_a_run_left_by_an_exception_is_failed_with_it(tmp_path: Path) -> None:
    from services.migrate import upgrade

    db = f"sqlite:///{tmp_path / 'o.db'}"
    upgrade(db)
    app = TestClient(create_app(make_settings(db)))
    with app, live_server(app.app) as url, OverparamClient(url) as op:  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="diverged"), op.start_run("boom", source=False) as run:
            run.log({"loss": float("nan")}, step=0)
            raise ValueError("diverged")
        failed = op.run(run.id)
        with op.start_run(name="fine", source={"script": "notebook"}) as ok:
            pass
        done = op.run(ok.id)
    assert (failed["status"], failed["error"]) == ("failed", "ValueError: diverged")
    assert "client" not in failed["manifest"]
    assert (done["status"], done["manifest"]["client"]) == ("succeeded", {"script": "notebook"})
