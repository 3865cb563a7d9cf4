"""The client distribution alone (`pip install ./client`, with its real dependencies) in a
fresh virtualenv: `import overparam` gives the client, `overparam --help` works, and neither
torch, Ray, SQLAlchemy nor FastAPI is installed, nor any of the server's top-level packages
(api, services, worker, migrations) that would collide with a user's modules."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import venv
from pathlib import Path

import pytest
from packaging.requirements import Requirement

pytestmark = pytest.mark.slow  # a virtualenv and a pip install (wheels from the pip cache)

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ["torch", "ray", "sqlalchemy", "fastapi", "scipy", "sklearn", "matplotlib", "pandas"]
SERVER = ["api", "services", "worker", "migrations"]


@pytest.fixture(scope="module")
def light_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv with only `pip install <copy of client/>` (a copy: the build writes build/
    and *.egg-info next to the sources)."""
    tmp = tmp_path_factory.mktemp("light")
    source = tmp / "client"
    shutil.copytree(
        ROOT / "client", source, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    )
    env_dir = tmp / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(source)],
        check=True,
        cwd=tmp,
        env=_env(),
    )
    return env_dir


def _env() -> dict[str, str]:
    """This process's environment less anything that would add the checkout to sys.path."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _run(venv_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv_dir / "bin" / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        cwd=venv_dir.parent,  # not the checkout: its folders would be importable from there
        env=_env(),
        timeout=120,
    )


def test_client_imports_without_the_server_stack(light_venv: Path) -> None:
    code = (
        "import importlib.util, json, sys, overparam; "
        "assert overparam.Client is overparam.OverparamClient; overparam.ntk.lambda_min; "
        "from overparam.client import OverparamClient; "
        "print(json.dumps({n: importlib.util.find_spec(n) is not None "
        f"for n in {HEAVY + SERVER}}}))"
    )
    done = _run(light_venv, "python", "-c", code)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert not [name for name, present in found.items() if present], found


def test_client_requires_only_its_four_dependencies(light_venv: Path) -> None:
    code = "import importlib.metadata as m, json; print(json.dumps(m.requires('overparam')))"
    done = _run(light_venv, "python", "-c", code)
    assert done.returncode == 0, done.stderr
    requirements = [Requirement(r) for r in json.loads(done.stdout)]
    required = {r.name.lower() for r in requirements if r.marker is None}
    assert {r.name.lower() for r in requirements if r.marker is not None} == {"pandas"}
    assert required == {"httpx", "typer", "rich", "pyyaml"}


def test_the_overparam_command_works_and_serve_asks_for_the_server(light_venv: Path) -> None:
    done = _run(light_venv, "overparam", "--help")
    assert done.returncode == 0, done.stderr
    assert "submit" in done.stdout and "serve" in done.stdout
    serve = _run(light_venv, "overparam", "serve", "--port", "1")
    assert serve.returncode == 1
    assert "needs the overparam server" in serve.stderr, serve.stderr + serve.stdout


def test_ntk_without_torch_says_what_to_install(light_venv: Path) -> None:
    code = "import overparam; overparam.ntk.lambda_min(None, None)"
    done = _run(light_venv, "python", "-c", code)
    assert done.returncode == 1
    assert "overparam.ntk needs torch" in done.stderr, done.stderr
