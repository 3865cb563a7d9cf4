"""docker-compose.yml brought up for real: the image is built, the stack started, the quickstart
(9 runs) submitted through the api container, and the Ray worker container that is running a
run killed mid-sweep (a second worker stays); every run must still succeed. Needs a running
Docker engine and a compose CLI, and skips without them (CI has neither); docs/deploy.md says
how it was run on a machine that reaches no image registry.

No registry: the base image is Debian bookworm from ``debootstrap`` (``docker import``), given
to the Dockerfile as PYTHON_IMAGE, and PostgreSQL is Debian's (tests/deploy/postgres), since
postgres:16 cannot be pulled. Builds use the host's network to reach the package registries and
build the CPU torch (TORCH_VARIANT=cpu); where a local wheelhouse (pip's PIP_FIND_LINKS) holds
the torch-2.13.0+cpu wheel, it is served to the build on 127.0.0.1 instead of PyTorch's index.
The compose file is used as it is but for what a machine without GPUs or registries needs: the
PostgreSQL image, no GPU reservation, 2 CPUs and no GPU per worker, 1 GB of /dev/shm. The build
time, image size, runs and the kill's outcome are printed (pytest -s) and written to
$OVERPARAM_TEST_ARTIFACTS/compose_up.json when that is set.

    OVERPARAM_TEST_BASE_IMAGE   the bookworm image to build on (debootstrapped when absent)
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import secrets
import shutil
import socket
import socketserver
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.deploy.test_compose import COMPOSE_FILE, compose_cli

pytestmark = [pytest.mark.slow, pytest.mark.timeout(7200)]

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("OVERPARAM_TEST_BASE_IMAGE", "overparam-base:bookworm")
IMAGE = "overparam:compose-test"
POSTGRES_IMAGE = "overparam-test-postgres:15"
TORCH_WHEEL = "torch-2.13.0+cpu-cp311-cp311-*.whl"
WHEELHOUSE_PORT = 38641
FINAL = {"succeeded", "diverged", "failed", "cancelled"}
REPORT: dict[str, Any] = {}


def docker(*args: str, check: bool = True) -> str:
    done = subprocess.run(["docker", *args], text=True, capture_output=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)}: {done.stderr[-4000:]}")
    return done.stdout


def record(key: str, value: Any) -> None:
    REPORT[key] = value
    print(f"compose-up: {key} = {value}")
    artifacts = os.environ.get("OVERPARAM_TEST_ARTIFACTS")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        (Path(artifacts) / "compose_up.json").write_text(json.dumps(REPORT, indent=2))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def compose() -> list[str]:
    cli = compose_cli()
    if shutil.which("docker") is None or cli is None:
        pytest.skip("no docker CLI or compose CLI on this machine")
    engine = subprocess.run(["docker", "info"], capture_output=True, check=False)
    if engine.returncode != 0:
        pytest.skip("no Docker engine running (docs/deploy.md: how this test was run)")
    return cli


def debootstrap_base_image(tmp: Path) -> None:
    """Debian bookworm with Python 3.11 and venv, from Debian's own mirror, as BASE_IMAGE. It
    trusts the CAs this host trusts (a proxy's included), so pip inside reaches the index."""
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip(f"no {BASE_IMAGE} image, and no debootstrap (as root) to make one")
    rootfs = tmp / "rootfs"
    include = "--include=python3,python3-venv,python-is-python3,ca-certificates"
    debootstrap = ["debootstrap", "--variant=minbase", include, "bookworm", str(rootfs)]
    subprocess.run(debootstrap, check=True, capture_output=True)
    host_cas = Path("/etc/ssl/certs/ca-certificates.crt")
    if host_cas.exists():
        shutil.copy(host_cas, rootfs / "etc/ssl/certs/ca-certificates.crt")
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    subprocess.run(["docker", "import", "-", BASE_IMAGE], stdin=tar.stdout, check=True)
    assert tar.wait() == 0
    shutil.rmtree(rootfs, ignore_errors=True)


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def torch_wheelhouse() -> Iterator[dict[str, str]]:
    """Build args that take torch's CPU wheel from a local wheelhouse, if pip has one."""
    links = os.environ.get("PIP_FIND_LINKS", "").split()
    folders = [Path(link.removeprefix("file://")) for link in links]
    found = [f for f in folders if f.is_dir() and any(f.glob(TORCH_WHEEL))]
    if not found:
        yield {}
        return
    handler = functools.partial(QuietHandler, directory=str(found[0]))
    try:  # the same URL every time: a build arg's value is part of the build cache's key
        server = socketserver.ThreadingTCPServer(("127.0.0.1", WHEELHOUSE_PORT), handler)
    except OSError:
        server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    with server:
        threading.Thread(target=server.serve_forever, daemon=True).start()
        try:
            port = server.server_address[1]
            yield {"TORCH_CPU_INDEX": "", "PIP_FIND_LINKS": f"http://127.0.0.1:{port}/"}
        finally:
            server.shutdown()


def build(tag: str, context: Path, args: dict[str, str], log: Path) -> None:
    """The classic builder: BuildKit would fetch the Dockerfile's syntax image from a registry."""
    argv = ["docker", "build", "--network", "host", "-t", tag, str(context)]
    argv[2:2] = [f"--build-arg={name}={value}" for name, value in args.items()]
    with log.open("w") as out:
        done = subprocess.run(
            argv, stdout=out, stderr=subprocess.STDOUT, env=os.environ | {"DOCKER_BUILDKIT": "0"}
        )
    assert done.returncode == 0, log.read_text()[-6000:]


@pytest.fixture(scope="module")
def images(compose: list[str], tmp_path_factory: pytest.TempPathFactory) -> None:
    tmp = tmp_path_factory.mktemp("images")
    if not docker("images", "-q", BASE_IMAGE).strip():
        debootstrap_base_image(tmp)
    with torch_wheelhouse() as torch_args:
        args = {"PYTHON_IMAGE": BASE_IMAGE, "TORCH_VARIANT": "cpu"} | torch_args
        started = time.monotonic()
        build(IMAGE, ROOT, args, tmp / "build.log")
        record("build_seconds", round(time.monotonic() - started))
    postgres = ROOT / "tests" / "deploy" / "postgres"
    build(POSTGRES_IMAGE, postgres, {"BASE_IMAGE": BASE_IMAGE}, tmp / "postgres.log")
    size = int(docker("image", "inspect", "--format", "{{.Size}}", IMAGE))
    record("image_size_mb", round(size / 1e6))
    torch = docker("run", "--rm", IMAGE, "python", "-c", "import torch; print(torch.__version__)")
    record("image_torch", torch.strip())


@dataclass
class Stack:
    command: list[str]  # the compose CLI with this file and project
    env: dict[str, str]
    base_url: str
    token: str = ""  # the first admin's

    def run(self, *args: str) -> str:
        done = subprocess.run(
            [*self.command, *args], env=self.env, text=True, capture_output=True, check=False
        )
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
        return done.stdout


def compose_file_here(folder: Path) -> Path:
    """docker-compose.yml (anchors and merges resolved) with this machine's three changes."""
    spec = yaml.safe_load(COMPOSE_FILE.read_text())
    spec["services"]["postgres"]["image"] = POSTGRES_IMAGE  # no registry to pull postgres:16
    del spec["services"]["ray-worker"]["deploy"]  # no GPUs: RAY_WORKER_GPUS=0 below
    path = folder / "docker-compose.yml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def stack(
    compose: list[str], images: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Stack]:
    folder = tmp_path_factory.mktemp("compose")
    api_port = free_port()
    env = dict(os.environ) | {
        "OVERPARAM_IMAGE": IMAGE,
        "POSTGRES_PASSWORD": secrets.token_hex(16),
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
        "RAY_WORKER_CPUS": "2",
        "RAY_WORKER_GPUS": "0",
        "RAY_WORKER_SHM_SIZE": "1gb",
        "API_PORT": str(api_port),
        "RAY_DASHBOARD_PORT": str(free_port()),
        # creating a container copies its image on the vfs storage driver: minutes, not seconds
        "COMPOSE_HTTP_TIMEOUT": "1200",
    }
    project = f"overparam-up-{secrets.token_hex(3)}"
    command = [*compose, "-f", str(compose_file_here(folder)), "-p", project]
    stack = Stack(command, env, f"http://127.0.0.1:{api_port}")
    try:
        started = time.monotonic()
        stack.run("up", "-d", "--no-build", "--scale", "ray-worker=2")
        stack.token = admin_token(stack)  # the API refuses to start without an admin
        wait_ready(stack)
        record("stack_ready_seconds", round(time.monotonic() - started))
        yield stack
    finally:
        logs = subprocess.run(
            [*command, "logs", "--no-color"], env=env, capture_output=True, text=True
        )
        artifacts = os.environ.get("OVERPARAM_TEST_ARTIFACTS")
        if artifacts:
            (Path(artifacts) / "compose_up.log").write_text(logs.stdout + logs.stderr)
        subprocess.run([*command, "down", "-v", "--remove-orphans"], env=env, capture_output=True)


def wait_ready(stack: Stack, limit: float = 900.0) -> None:
    """Until the api container's /readyz answers 200 (database up, a dispatcher leads)."""
    deadline = time.monotonic() + limit
    answer = "no answer"
    while time.monotonic() < deadline:
        try:
            response = httpx.get(f"{stack.base_url}/readyz", timeout=5)
            if response.status_code == 200:
                return
            answer = response.text
        except httpx.HTTPError as exc:
            answer = repr(exc)
        time.sleep(3)
    raise AssertionError(f"not ready: {answer}\n{stack.run('ps')}")


def admin_token(stack: Stack) -> str:
    """The first admin, made as docker-compose.yml says (the CLI in the migrate service)."""
    create = ("overparam", "admin", "create-user", "tester", "--admin")
    out = stack.run("run", "--rm", "--no-deps", "-T", "migrate", *create)
    return out.strip().splitlines()[-1].strip()


def busy_worker(stack: Stack) -> str | None:
    """A ray-worker container with a Ray worker process training a run: its title is
    ``ray::_run_training`` (worker/task.py) while it executes, ``ray::IDLE`` between tasks."""
    for container in stack.run("ps", "-q", "ray-worker").split():
        processes = docker("top", container, "-eo", "pid,args").splitlines()[1:]
        titles = [line.split(None, 1)[-1] for line in processes]
        if any(t.startswith("ray::_run_training") for t in titles):
            return container
    return None


def test_the_quickstart_survives_a_worker_killed_mid_sweep(stack: Stack) -> None:
    headers = {"Authorization": f"Bearer {stack.token}"}
    spec = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=30) as api:
        created = api.post("/api/v1/sweeps", json=spec)
        assert created.status_code == 201, created.text
        sweep_id = created.json()["id"]
        started = time.monotonic()

        def runs() -> list[dict[str, Any]]:
            page = api.get("/api/v1/runs", params={"sweep_id": sweep_id, "limit": 100})
            data: list[dict[str, Any]] = page.json()["data"]
            return data

        victim, deadline = None, time.monotonic() + 900
        while victim is None and time.monotonic() < deadline:
            victim = busy_worker(stack)
            time.sleep(0.5)
        assert victim is not None, "no worker container ever ran a run"
        at_kill = Counter(r["status"] for r in runs())
        docker("kill", victim)
        record("killed_worker", {"container": victim[:12], "runs_at_kill": dict(at_kill)})

        deadline = time.monotonic() + 3600
        while time.monotonic() < deadline:
            final = runs()
            if len(final) == 9 and all(r["status"] in FINAL for r in final):
                break
            time.sleep(2)
        record("sweep_seconds", round(time.monotonic() - started))
    statuses = Counter(r["status"] for r in final)
    retried = sorted(r["index"] for r in final if r["attempt"] > 1)
    record("runs", f"{statuses['succeeded']}/{len(final)} succeeded {dict(statuses)}")
    record("runs_retried_after_the_kill", retried)
    assert len(final) == 9 and statuses == {"succeeded": 9}, final
    assert retried, "the killed worker was running a run: it must have been retried"
    alive = docker("ps", "-q", "--filter", f"id={victim}").strip()
    record("killed_worker_restarted_by_docker", bool(alive))
