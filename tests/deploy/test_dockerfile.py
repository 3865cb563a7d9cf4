"""The Dockerfile builds the one image every process runs: Python 3.11 on slim bookworm in every
stage, Ray 2.60 from pyproject.toml, torch 2.13.0 from the CPU index or PyPI's CUDA build, a
non-root user and a health check; .dockerignore keeps secrets and the local virtualenv out.
Read as text; tests/deploy/test_compose_up.py builds it where a Docker engine runs."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
# one logical line per instruction (continuations joined), comments dropped
INSTRUCTIONS = [
    line.strip()
    for line in re.sub(r"\\\n", " ", DOCKERFILE).splitlines()
    if line.strip() and not line.lstrip().startswith("#")
]


def instructions(keyword: str) -> list[str]:
    return [i.split(None, 1)[1] for i in INSTRUCTIONS if i.split(None, 1)[0].upper() == keyword]


def test_every_stage_is_python_3_11_slim_bookworm() -> None:
    assert "PYTHON_IMAGE=python:3.11-slim-bookworm" in instructions("ARG")
    stages = instructions("FROM")
    assert len(stages) >= 2, "multi-stage: build tools and caches stay out of the runtime"
    assert all(stage.startswith("${PYTHON_IMAGE}") for stage in stages)


def test_torch_variant_picks_the_index() -> None:
    assert "TORCH_VARIANT=cuda" in instructions("ARG"), "CUDA by default"
    (install,) = [run for run in instructions("RUN") if "TORCH_VARIANT" in run]
    cuda = re.search(r"cuda\)(.*?);;", install)
    cpu = re.search(r"cpu\)(.*?);;", install)
    assert cuda and cpu
    assert '"torch==2.13.0"' in cuda.group(1) and "--index-url" not in cuda.group(1)
    assert '"torch==2.13.0" ${TORCH_CPU_INDEX:+--index-url "$TORCH_CPU_INDEX"}' in cpu.group(1)
    assert "TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu" in instructions("ARG")
    # the build fails when the variant asked for is not the one installed (a CUDA wheel that
    # a mirror or wheelhouse served for the CPU build, or the reverse)
    assert "torch.version.cuda is not None) == ('$TORCH_VARIANT' == 'cuda')" in install


def test_ray_comes_pinned_from_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "ray[default]>=2.60,<2.61" in project["dependencies"]
    assert any("pyproject.toml" in copy for copy in instructions("COPY"))
    assert any("ray.__version__.startswith('2.60.')" in run for run in instructions("RUN"))


def test_every_package_is_copied_into_the_image() -> None:
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    copied = {copy.split()[0] for copy in instructions("COPY") if "--from" not in copy}
    for pattern in packages["packages"]["find"]["include"]:
        assert pattern.rstrip("*") in copied, pattern


def test_the_client_is_installed_then_the_server() -> None:
    """Two distributions: `overparam` from client/ (its own pyproject.toml), then
    `overparam-server` from the root, which requires it (left out of the dependency step)."""
    copied = {copy.split()[0] for copy in instructions("COPY") if "--from" not in copy}
    assert {"client", "client/pyproject.toml"} <= copied
    (install,) = [run for run in instructions("RUN") if "pip install --no-deps" in run]
    assert install.index("pip install --no-deps /src/client") < install.index(
        "pip install --no-deps /src "
    )
    (deps,) = [run for run in instructions("RUN") if "/tmp/requirements.txt" in run]
    assert "/src/client/pyproject.toml" in deps and "overparam=" in deps


def test_runs_as_an_unprivileged_user_with_a_health_check() -> None:
    (user,) = instructions("USER")
    assert user not in ("root", "0")
    assert INSTRUCTIONS.index(f"USER {user}") > max(
        i for i, line in enumerate(INSTRUCTIONS) if line.startswith("RUN")
    ), "nothing runs as root after USER"
    (check,) = instructions("HEALTHCHECK")
    assert "/readyz" in check
    assert not instructions("ENTRYPOINT"), "compose picks each container's command"


def test_dockerignore_is_an_allowlist_without_secrets() -> None:
    lines = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert lines[0] == "*", "everything is excluded unless listed"
    allowed = {line[1:] for line in lines if line.startswith("!")}
    assert not allowed & {".env", ".venv", ".git", "data"}
    copied = {copy.split()[0] for copy in instructions("COPY") if "--from" not in copy}
    tops = {source.split("/")[0] for source in copied}  # client/pyproject.toml: in client
    assert tops <= allowed, "every COPY source is in the build context"
