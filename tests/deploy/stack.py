"""The deployment's processes, described once.

``docker-compose.yml``, the Kubernetes manifests (``deploy/k8s``) and the process harness
(``topology.py``) all describe the same stack: which program each service runs, with which
arguments, environment, health check, published ports, shared-memory size, GPU reservation and
checkpoint volume. This module is that description. Commands and environment values are
templates with ``{placeholders}`` for the only things that differ between a compose network, a
Kubernetes namespace and one test host: addresses, ports, sizes and the token. ``COMPOSE`` fills
them the way docker-compose.yml must spell them (``test_compose.py`` checks the file against
it), ``KUBERNETES`` the way the manifests do (``test_k8s.py``); the harness fills them with free
ports on 127.0.0.1 and adds the host-only flags in ``topology.py`` (several Ray nodes on one
host must not share ports or temp dirs).

PostgreSQL is not here: compose runs the postgres:16 image, Kubernetes an external server (or
the postgres:16 StatefulSet of ``deploy/k8s/with-postgres``), the harness an existing server.
Neither are Prometheus and Grafana: compose starts them only under the ``observability``
profile (``test_observability.py`` checks their configuration).
"""

from __future__ import annotations

import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

# Where every Ray process finds the token. RAY_AUTH_TOKEN outranks RAY_AUTH_TOKEN_PATH and
# ~/.ray/auth_token; RAY_AUTH_MODE=token must be set explicitly on every node and on the driver:
# `ray start --head` and `ray.init(address=...)` only switch token auth on by themselves when a
# token file already exists (Ray 2.60, ray/_private/authentication/authentication_token_setup.py).
RAY_AUTH_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "{ray_auth_token}"}
DATABASE_ENV = {"OVERPARAM_DATABASE_URL": "{database_url}"}
CHECKPOINT_ENV = {"OVERPARAM_CHECKPOINT_DIR": "{checkpoint_dir}"}


@dataclass(frozen=True)
class Addresses:
    """The values of the placeholders in :data:`SERVICES`."""

    database_url: str
    ray_address: str  # host:port of the head's GCS, for worker nodes and the dispatcher
    ray_port: str  # the GCS port the head listens on
    bind_host: str  # interface the API and the Ray dashboard listen on
    api_port: str
    dashboard_port: str
    checkpoint_dir: str
    ray_auth_token: str
    metrics_token: str  # the bearer token Prometheus scrapes the API's /metrics with
    worker_cpus: str
    worker_gpus: str
    # the API's name for the other services (Prometheus scrapes it there): a Host it answers to
    api_host: str = "api"

    def render(self, template: str) -> str:
        return template.format(**{f.name: getattr(self, f.name) for f in fields(self)})


@dataclass(frozen=True)
class Service:
    """One compose service, i.e. one kind of process of the stack."""

    command: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)
    # argv of the health check (compose: `test: [CMD, ...]`); None: compose disables it
    healthcheck: tuple[str, ...] | None = None
    # compose: `ray start` a zero-resource Ray node first, then `exec` the command. A Ray driver
    # must run on a node of the cluster: ray.init(address=...) attaches to a raylet on its own
    # host. The harness skips it: on one host the driver attaches to the head's raylet.
    driver_node: tuple[str, ...] | None = None
    # (host-port variable, container port): published as 127.0.0.1:${VAR:-port}:port
    publish: tuple[tuple[str, str], ...] = ()
    shm_size: str | None = None  # compose only: Docker's 64 MB /dev/shm starves Ray's store
    gpus: bool = False  # compose only: deploy.resources.reservations.devices (nvidia, gpu)
    checkpoints: bool = False  # mounts the shared checkpoint volume at {checkpoint_dir}
    depends_on: Mapping[str, str] = field(default_factory=dict)  # service -> compose condition

    def ray_process(self) -> bool:
        """True for the services that run Ray (a node or a driver): they need the token."""
        return self.command[:2] == ("ray", "start") or self.driver_node is not None

    def argv(self, at: Addresses) -> list[str]:
        """The command as the harness runs it (no driver-node prefix)."""
        return [at.render(arg) for arg in self.command]

    def compose_command(self, at: Addresses) -> list[str]:
        """The command as docker-compose.yml spells it."""
        if self.driver_node is None:
            return self.argv(at)
        prefix = shlex.join(at.render(arg) for arg in self.driver_node)
        return ["sh", "-c", f"{prefix} && exec {shlex.join(self.argv(at))}"]

    def environment(self, at: Addresses) -> dict[str, str]:
        return {name: at.render(value) for name, value in self.env.items()}


SERVICES: dict[str, Service] = {
    "migrate": Service(
        command=("overparam", "db", "upgrade"),
        env=DATABASE_ENV,
        depends_on={"postgres": "service_healthy"},
    ),
    "api": Service(
        # Several workers are safe: the API holds no Ray driver and does not migrate. `serve`
        # gives them one directory for their Prometheus counts (PROMETHEUS_MULTIPROC_DIR).
        command=(
            "overparam",
            "serve",
            "--host",
            "{bind_host}",
            "--port",
            "{api_port}",
            "--workers",
            "2",
        ),
        env=DATABASE_ENV
        | {
            "OVERPARAM_EMBEDDED_DISPATCHER": "false",
            "OVERPARAM_AUTH": "required",
            "OVERPARAM_ALLOWED_HOSTS": '["localhost","127.0.0.1","{api_host}"]',
            "OVERPARAM_METRICS_TOKEN": "{metrics_token}",
        },
        healthcheck=(
            "python",
            "-c",
            "import urllib.request; "
            "urllib.request.urlopen('http://127.0.0.1:{api_port}/readyz', timeout=5)",
        ),
        publish=(("API_PORT", "{api_port}"),),
        depends_on={"migrate": "service_completed_successfully"},
    ),
    "dispatcher": Service(
        command=("overparam", "dispatch"),
        env=DATABASE_ENV
        | RAY_AUTH_ENV
        | CHECKPOINT_ENV
        | {"OVERPARAM_RAY_ADDRESS": "{ray_address}"},
        driver_node=(
            "ray",
            "start",
            "--address={ray_address}",
            "--num-cpus=0",
            "--num-gpus=0",
            "--disable-usage-stats",
        ),
        shm_size="1gb",
        checkpoints=True,
        depends_on={
            "migrate": "service_completed_successfully",
            "ray-head": "service_healthy",
        },
    ),
    "ray-head": Service(
        # No CPUs or GPUs: no run is ever scheduled on the head (GCS, dashboard, autoscaler).
        command=(
            "ray",
            "start",
            "--head",
            "--num-cpus=0",
            "--num-gpus=0",
            "--port={ray_port}",
            "--dashboard-host={bind_host}",
            "--dashboard-port={dashboard_port}",
            "--disable-usage-stats",
            "--block",
        ),
        env=RAY_AUTH_ENV,
        healthcheck=("ray", "health-check", "--address=127.0.0.1:{ray_port}"),
        publish=(("RAY_DASHBOARD_PORT", "{dashboard_port}"),),
        shm_size="2gb",
    ),
    "ray-worker": Service(
        # GPUs are passed explicitly: Ray's autodetection inside a container is not trusted.
        command=(
            "ray",
            "start",
            "--address={ray_address}",
            "--num-cpus={worker_cpus}",
            "--num-gpus={worker_gpus}",
            "--disable-usage-stats",
            "--block",
        ),
        env=RAY_AUTH_ENV | CHECKPOINT_ENV,
        healthcheck=("ray", "health-check", "--address={ray_address}"),
        shm_size="${RAY_WORKER_SHM_SIZE:-8gb}",
        gpus=True,
        checkpoints=True,
        depends_on={"ray-head": "service_healthy"},
    ),
}

COMPOSE = Addresses(
    database_url=(
        "postgresql://overparam:${POSTGRES_PASSWORD:?set POSTGRES_PASSWORD in .env}"
        "@postgres:5432/overparam"
    ),
    ray_address="ray-head:6379",
    ray_port="6379",
    bind_host="0.0.0.0",
    api_port="8000",
    dashboard_port="8265",
    checkpoint_dir="/var/lib/overparam/checkpoints",
    ray_auth_token="${RAY_AUTH_TOKEN:?set RAY_AUTH_TOKEN in .env}",
    metrics_token="${METRICS_TOKEN:-}",
    worker_cpus="${RAY_WORKER_CPUS:-4}",
    worker_gpus="${RAY_WORKER_GPUS:-1}",
)

# Values that come from the Kubernetes Secret are spelled "secret:NAME/KEY" (test_k8s.py reads a
# container's `valueFrom.secretKeyRef` that way). `auth_token` is the key KubeRay's authOptions
# reads; the head's Service is the one KubeRay names after the RayCluster (`<name>-head-svc`).
KUBERNETES = Addresses(
    database_url="secret:overparam/database-url",
    ray_address="overparam-head-svc:6379",
    ray_port="6379",
    bind_host="0.0.0.0",
    api_port="8000",
    dashboard_port="8265",
    checkpoint_dir="/var/lib/overparam/checkpoints",
    ray_auth_token="secret:overparam/auth_token",
    metrics_token="secret:overparam/metrics-token",
    worker_cpus="4",
    worker_gpus="1",
    api_host="overparam-api",
)
