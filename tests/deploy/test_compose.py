"""docker-compose.yml describes the stack of tests/deploy/stack.py, the description the process
harness runs; .env.example documents every variable the file uses. No Docker needed: the file
is read with PyYAML (anchors and merge keys resolved as compose resolves them). Where a compose
CLI is installed, it must accept the file too."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.stack import COMPOSE, SERVICES, Service
from tests.deploy.topology import BIN_DIR, HOST_ONLY_FLAGS, Topology, harness_argv

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_FILE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
IMAGE = "${OVERPARAM_IMAGE:-overparam:latest}"
# ${VAR}, ${VAR:-default}, ${VAR:?error}, ...; "$${" is an escaped dollar, not a variable
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose["services"]
    return found


def published(service: Service) -> list[str]:
    return [
        f"127.0.0.1:${{{var}:-{COMPOSE.render(port)}}}:{COMPOSE.render(port)}"
        for var, port in service.publish
    ]


def ray_command(entry: dict[str, Any]) -> bool:
    """The service starts a Ray node (ray-head, ray-worker, the dispatcher's driver node)."""
    return "ray start" in " ".join(str(arg) for arg in entry.get("command") or [])


# -- the same stack as the harness ------------------------------------------------------------


def test_the_services_are_the_stack_plus_postgres(services: dict[str, Any]) -> None:
    """Besides those under a profile (Prometheus and Grafana: test_observability.py)."""
    always = {name for name, entry in services.items() if not entry.get("profiles")}
    assert always == {"postgres", *SERVICES}


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_service_matches_the_stack_description(
    name: str, services: dict[str, dict[str, Any]]
) -> None:
    spec, entry = SERVICES[name], services[name]
    assert entry["command"] == spec.compose_command(COMPOSE)
    assert entry["environment"] == spec.environment(COMPOSE)
    assert entry["image"] == IMAGE, "one image for every process"
    assert entry["build"] == {"context": ".", "args": {"TORCH_VARIANT": "${TORCH_VARIANT:-cuda}"}}
    assert entry["init"] is True
    if spec.healthcheck is None:
        assert entry["healthcheck"] == {"disable": True}
    else:
        rendered = [COMPOSE.render(arg) for arg in spec.healthcheck]
        assert entry["healthcheck"]["test"] == ["CMD", *rendered]
    assert entry.get("ports", []) == published(spec)
    assert entry.get("shm_size") == spec.shm_size
    assert ("deploy" in entry) == spec.gpus
    mounts = [f"checkpoints:{COMPOSE.checkpoint_dir}"] if spec.checkpoints else []
    assert entry.get("volumes", []) == mounts
    assert entry.get("depends_on", {}) == {
        dep: {"condition": condition} for dep, condition in spec.depends_on.items()
    }


def test_the_file_shares_image_and_environment_through_an_anchor(compose: dict[str, Any]) -> None:
    text = COMPOSE_FILE.read_text()
    assert "x-overparam" in compose and "&overparam" in text
    assert text.count("<<: *overparam") == len(SERVICES)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_the_harness_runs_the_compose_command_and_environment(name: str, tmp_path: Path) -> None:
    """The harness's argv is the compose command with its own addresses plus the declared
    host-only flags; its environment is the compose service's plus the image's."""
    topo = Topology("postgresql://harness@127.0.0.1/db", root=tmp_path)
    try:
        spec = SERVICES[name]
        host = {"temp_dir": str(tmp_path / name), "client_port": "1"}
        argv = harness_argv(name, topo.addresses, **host)
        extra = [flag.format(**host) for flag in HOST_ONLY_FLAGS.get(name, ())]
        assert argv[0] == str(BIN_DIR / spec.command[0]), "the program from this virtualenv"
        assert argv[1:] == spec.argv(topo.addresses)[1:] + extra
        env = topo.environment(name, name)
        assert spec.environment(topo.addresses).items() <= env.items()
        ours = {k for k in env if k.startswith(("RAY_", "OVERPARAM_"))}
        image = {"OVERPARAM_DATA_DIR", "OVERPARAM_CHECKPOINT_DIR"}
        assert ours <= set(spec.environment(topo.addresses)) | image
    finally:
        topo.close()


# -- the properties docs/deploy.md promises ---------------------------------------------------


def test_every_published_port_is_bound_to_localhost(services: dict[str, Any]) -> None:
    for name, entry in services.items():
        for port in entry.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), (name, port)
    assert "ports" not in services["postgres"], "PostgreSQL stays on the compose network"


def test_the_ray_head_runs_no_work(services: dict[str, Any]) -> None:
    command = services["ray-head"]["command"]
    assert {"--head", "--num-cpus=0", "--num-gpus=0", "--block"} <= set(command)
    assert "--port=6379" in command
    assert services["ray-head"]["shm_size"]


def test_workers_announce_the_gpus_they_reserve(services: dict[str, Any]) -> None:
    worker = services["ray-worker"]
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert f"--num-gpus={device['count']}" in worker["command"]
    assert device["count"] == "${RAY_WORKER_GPUS:-1}"
    assert "--address=ray-head:6379" in worker["command"]
    assert worker["shm_size"] and "--block" in worker["command"]
    assert "container_name" not in worker, "a fixed name would forbid --scale ray-worker=N"


def test_every_ray_process_has_the_same_token_and_nothing_else_does(
    services: dict[str, Any],
) -> None:
    ray_services = {name for name, entry in services.items() if ray_command(entry)}
    assert ray_services == {"ray-head", "ray-worker", "dispatcher"}
    assert ray_services == {name for name, spec in SERVICES.items() if spec.ray_process()}
    tokens = set()
    for name in ray_services:
        env = services[name]["environment"]
        assert env["RAY_AUTH_MODE"] == "token", name
        tokens.add(env["RAY_AUTH_TOKEN"])
    assert tokens == {"${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN in .env}"}, "one required token"
    for name in set(services) - ray_services:
        assert not any(k.startswith("RAY_AUTH") for k in services[name].get("environment", {}))


def test_dispatcher_and_workers_share_the_checkpoint_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = set()
    for name in ("dispatcher", "ray-worker"):
        (mount,) = services[name]["volumes"]
        volume, path = mount.split(":")
        assert services[name]["environment"]["OVERPARAM_CHECKPOINT_DIR"] == path
        mounts.add((volume, path))
    assert mounts == {("checkpoints", "/var/lib/overparam/checkpoints")}
    assert "checkpoints" in compose["volumes"]


def test_the_api_runs_two_workers_without_a_dispatcher(services: dict[str, Any]) -> None:
    api = services["api"]
    command = api["command"]
    assert command[:2] == ["overparam", "serve"]
    assert command[command.index("--workers") + 1] == "2"
    assert api["environment"]["OVERPARAM_EMBEDDED_DISPATCHER"] == "false"
    assert api["depends_on"] == {"migrate": {"condition": "service_completed_successfully"}}


def test_the_dispatcher_is_a_driver_on_a_node_without_resources(
    services: dict[str, Any],
) -> None:
    sh, flag, script = services["dispatcher"]["command"]
    assert (sh, flag) == ("sh", "-c")
    node, dispatch = script.split(" && exec ")
    assert node.split()[:2] == ["ray", "start"] and "--block" not in node
    assert {"--num-cpus=0", "--num-gpus=0", "--address=ray-head:6379"} <= set(node.split())
    assert dispatch == "overparam dispatch"
    assert services["dispatcher"]["environment"]["OVERPARAM_RAY_ADDRESS"] == "ray-head:6379"


def test_postgres_is_persistent_and_migrated_first(compose: dict[str, Any]) -> None:
    postgres = compose["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    assert postgres["volumes"] == ["pgdata:/var/lib/postgresql/data"]
    assert "pgdata" in compose["volumes"]
    assert postgres["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    migrate = compose["services"]["migrate"]
    assert migrate["restart"] == "no", "a one-shot"
    assert migrate["depends_on"] == {"postgres": {"condition": "service_healthy"}}


# -- .env.example -----------------------------------------------------------------------------


def documented_variables() -> dict[str, str]:
    """VAR -> the comment lines right above ``VAR=`` in .env.example."""
    found, comment = {}, []
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("#"):
            comment.append(line.lstrip("# "))
        elif "=" in line:
            found[line.split("=", 1)[0].strip()] = " ".join(comment)
            comment = []
        else:
            comment = []
    return found


def test_env_example_documents_every_variable_compose_uses() -> None:
    used = set(VARIABLE.findall(COMPOSE_FILE.read_text()))
    documented = documented_variables()
    assert used - set(documented) == set(), "undocumented"
    assert set(documented) - used == set(), "documented but unused"
    for var, comment in documented.items():
        assert comment, f"{var} has no comment"


def test_required_secrets_are_empty_in_the_example() -> None:
    text = COMPOSE_FILE.read_text()
    values = dict(
        line.split("=", 1) for line in ENV_EXAMPLE.read_text().splitlines() if "=" in line
    )
    for secret in ("POSTGRES_PASSWORD", "RAY_AUTH_TOKEN"):
        assert f"${{{secret}:?" in text, f"compose refuses to start without {secret}"
        assert values[secret] == "", f"no default {secret} anyone could copy"


# -- a real compose CLI, where there is one ---------------------------------------------------


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_a_compose_cli_accepts_the_file(tmp_path: Path) -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no docker compose / docker-compose on this machine")
    # an empty project directory: no .env of the developer's fills anything in
    config = [*cli, "-f", str(COMPOSE_FILE), "--project-directory", str(tmp_path), "config", "-q"]
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path)}
    secrets = {"POSTGRES_PASSWORD": "x", "RAY_AUTH_TOKEN": "y"}
    ok = subprocess.run(config, env=env | secrets, capture_output=True, text=True, check=False)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run(config, env=env, capture_output=True, text=True, check=False)
    assert missing.returncode != 0 and "POSTGRES_PASSWORD" in missing.stderr + missing.stdout
