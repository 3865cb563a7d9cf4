"""The compose stack as plain subprocesses on one host, for tests (no Docker needed).

:class:`Topology` starts what docker-compose.yml starts, from the same description
(:data:`tests.deploy.stack.SERVICES`): the migration, a Ray head with no CPUs or GPUs, worker
nodes that join it, the API (``overparam serve``) with two uvicorn workers, and dispatchers,
each with the environment its compose service gets (token auth on every Ray process).
PostgreSQL is an existing server; the caller passes a fresh database's URL.

Several Ray nodes on one host: each node gets its own ``--temp-dir`` (sessions, sockets, logs)
and lets the OS pick its worker, agent and manager ports (``0``); the head's GCS, dashboard and
client-server ports are free ports picked here. The flags that differ from compose are
:data:`HOST_ONLY_FLAGS`; the other substitutions are the :class:`Addresses` the harness fills.
One difference in what runs: compose's dispatcher first starts a Ray node without resources
(a driver must run on a node of the cluster); here the dispatcher's driver attaches to the
head's raylet, which is on the same host (Ray prefers the head), so killing a worker node never
takes a dispatcher with it.

Each process is started in its own session with a marker in its environment
(``OVP_TOPOLOGY=<id>/<name>``) that everything it spawns inherits (raylets, Ray workers, agents,
uvicorn workers). Killing one worker node SIGKILLs exactly the processes that carry its marker
or descend from its ``ray start``; :meth:`Topology.close` stops everything gracefully, then
SIGKILLs whatever still carries this topology's id. It never runs ``ray stop``, which would hit
every Ray cluster on the machine.

    with Topology(database_url, workers=2, dispatchers=1) as topo:
        httpx.get(f"{topo.base_url}/readyz")
        topo.kill_worker("ray-worker-1")
        topo.add_worker()
        topo.kill_dispatcher("dispatcher-1")
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx

from tests.conftest import create_pg_database, drop_pg_database
from tests.deploy.stack import SERVICES, Addresses

MARKER = "OVP_TOPOLOGY"
BIN_DIR = Path(sys.executable).parent

# Flags only the one-host harness adds (compose runs each node in its own container).
HOST_ONLY_FLAGS: dict[str, tuple[str, ...]] = {
    "ray-head": (
        "--temp-dir={temp_dir}",
        "--ray-client-server-port={client_port}",
        "--dashboard-agent-listen-port=0",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ),
    "ray-worker": (
        "--temp-dir={temp_dir}",
        "--dashboard-agent-listen-port=0",
        "--min-worker-port=0",
        "--max-worker-port=0",
    ),
}


class Patient(httpx.HTTPTransport):
    """A client that waits out a 429 (its ``Retry-After``) and asks again, as well-behaved
    clients of the lab service do: it limits requests per token (OVERPARAM_RATE_LIMIT), and a
    test that polls 50 finished sweeps back to back goes past it."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        while True:
            response = super().handle_request(request)
            if response.status_code != 429:
                return response
            response.read()
            response.close()
            time.sleep(float(response.headers.get("retry-after", "1")))


def free_port() -> int:
    """A TCP port nobody listens on now (on every interface: Ray's GCS binds 0.0.0.0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def harness_argv(service: str, at: Addresses, **host: str) -> list[str]:
    """The argv the harness runs for ``service``: its compose command with the harness's
    addresses, the host-only flags appended, and programs resolved in this virtualenv."""
    argv = SERVICES[service].argv(at) + [
        flag.format(**host) for flag in HOST_ONLY_FLAGS.get(service, ())
    ]
    program = BIN_DIR / argv[0]
    return [str(program) if program.exists() else argv[0], *argv[1:]]


# -- processes by /proc (Linux) ---------------------------------------------------------------


def _alive_pids() -> dict[int, int]:
    """pid -> ppid of every process that is not a zombie."""
    table = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses
        state, ppid = stat[stat.rindex(")") + 2 :].split()[:2]
        if state not in ("Z", "X"):
            table[int(entry.name)] = int(ppid)
    return table


def descendants(root: int) -> set[int]:
    """``root`` and every live process below it."""
    children: dict[int, list[int]] = {}
    table = _alive_pids()
    for pid, ppid in table.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = set(), [root] if root in table else []
    while todo:
        pid = todo.pop()
        found.add(pid)
        todo.extend(children.get(pid, []))
    return found


def marked(tag: str) -> set[int]:
    """Live processes whose environment has ``OVP_TOPOLOGY=<tag>``; a tag ending in "/" (a
    topology's id) matches every process of that topology."""
    needle = f"{MARKER}={tag}".encode()
    pids = set()
    for pid in _alive_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:  # gone, or not ours to read
            continue
        for var in environ.split(b"\0"):
            if var == needle or (tag.endswith("/") and var.startswith(needle)):
                pids.add(pid)
                break
    return pids


def sigkill(pids: Iterable[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")
    except OSError:
        return []


# -- the topology -----------------------------------------------------------------------------


@dataclass
class Proc:
    """One process the harness started (for a Ray node: its ``ray start --block``)."""

    name: str  # "ray-head", "ray-worker-1", "api", "dispatcher-1", ...
    service: str  # its key in SERVICES
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def node_id(self) -> str | None:
        """A Ray node's id (hex), read from its raylet's command line; None before it runs."""
        for pid in descendants(self.pid):
            args = cmdline(pid)
            if args and args[0].endswith("/raylet"):
                for arg in args:
                    if arg.startswith("--node_id="):
                        return arg.split("=", 1)[1]
        return None


class TopologyError(RuntimeError):
    pass


class Topology:
    """The stack of docker-compose.yml as processes on this host; see the module docstring."""

    def __init__(
        self,
        database_url: str,
        *,
        workers: int = 2,
        dispatchers: int = 1,
        worker_cpus: int = 1,
        worker_gpus: int = 0,
        extra_env: Mapping[str, Mapping[str, str]] | None = None,
        root: Path | None = None,
    ) -> None:
        """``worker_cpus``/``worker_gpus``: what each worker node announces (``--num-gpus``
        on a host without GPUs makes Ray count GPUs that are not there: enough to test
        scheduling and fractional requests). ``extra_env``: service name -> variables added on
        top of compose's, for test knobs compose does not set, e.g.
        ``{"ray-head": {"RAY_health_check_period_ms": "500"}}`` to notice a killed node sooner
        than Ray's default ~15 s."""
        self.id = uuid.uuid4().hex[:12]
        # Short: Ray's unix sockets live under each node's temp dir (108-byte path limit).
        self.root = root or Path(tempfile.mkdtemp(prefix="ovp-", dir="/tmp"))
        self.initial_workers, self.initial_dispatchers = workers, dispatchers
        self.token = secrets.token_hex(32)
        self.metrics_token = secrets.token_hex(16)
        ray_port, api_port, dashboard_port = free_port(), free_port(), free_port()
        self.client_port = free_port()
        self.addresses = Addresses(
            database_url=database_url,
            ray_address=f"127.0.0.1:{ray_port}",
            ray_port=str(ray_port),
            bind_host="127.0.0.1",
            api_port=str(api_port),
            dashboard_port=str(dashboard_port),
            checkpoint_dir=str(self.root / "checkpoints"),
            ray_auth_token=self.token,
            metrics_token=self.metrics_token,
            worker_cpus=str(worker_cpus),
            worker_gpus=str(worker_gpus),
        )
        self.base_url = f"http://127.0.0.1:{api_port}"
        self.dashboard_url = f"http://127.0.0.1:{dashboard_port}"
        self.extra_env = {name: dict(env) for name, env in (extra_env or {}).items()}
        self.procs: dict[str, Proc] = {}
        self._counters: dict[str, int] = {}
        self._closed = False
        atexit.register(self.close)

    # -- bring-up ---------------------------------------------------------------------------

    def start(self, timeout: float = 90.0) -> Topology:
        """Migrate, start every process, and wait until the API answers ``/readyz`` and all
        worker nodes are alive in the cluster. Tears everything down if any step fails."""
        deadline = time.monotonic() + timeout
        try:
            (self.root / "checkpoints").mkdir(parents=True, exist_ok=True)
            # the slowest to come up: start it first
            head = self._spawn("ray-head", "ray-head", temp_dir=str(self.root / "head"))
            self.migrate()
            self.admin_token = self.create_admin()
            self._spawn("api", "api")
            self.wait_for(lambda: self._healthy(head), deadline, "the Ray head's health check")
            for _ in range(self.initial_workers):
                self.add_worker(wait=False)
            for _ in range(self.initial_dispatchers):
                self.add_dispatcher()
            self.wait_for(self._api_ready, deadline, "the API's /readyz")
            self.wait_nodes(self.initial_workers, deadline=deadline)
        except BaseException:
            self.close()
            raise
        return self

    def migrate(self) -> None:
        """Run the migrate service's command to completion (compose: the one-shot service)."""
        log = self.root / "logs" / "migrate.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            done = subprocess.run(
                harness_argv("migrate", self.addresses),
                env=self.environment("migrate", "migrate"),
                cwd=self.root,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=120,
                check=False,
            )
        if done.returncode != 0:
            raise TopologyError(f"migrate exited {done.returncode}:\n{self.tail(log)}")

    def create_admin(self) -> str:
        """The first admin, as docs/deploy.md says (the API requires tokens); its token."""
        done = subprocess.run(
            [
                *harness_argv("migrate", self.addresses)[:-2],
                "admin",
                "create-user",
                "admin",
                "--admin",
            ],
            env=self.environment("migrate", "migrate"),
            cwd=self.root,
            capture_output=True,
            timeout=120,
            check=False,
        )
        if done.returncode != 0:
            raise TopologyError(f"admin create-user exited {done.returncode}: {done.stderr!r}")
        return done.stdout.decode().split()[-1]

    @property
    def headers(self) -> dict[str, str]:
        """What a client of the API sends: the admin's token."""
        return {"Authorization": f"Bearer {self.admin_token}"}

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(
            base_url=self.base_url, timeout=timeout, headers=self.headers, transport=Patient()
        )

    def add_worker(self, *, wait: bool = True, timeout: float = 60.0) -> Proc:
        """Start one more Ray worker node (``ray-worker-<n>``); by default wait until the
        cluster lists it alive."""
        name = self._next("ray-worker")
        proc = self._spawn(name, "ray-worker", temp_dir=str(self.root / name))
        if wait:
            self.wait_for(
                lambda: (node := proc.node_id()) is not None and node in self.alive_node_ids(),
                time.monotonic() + timeout,
                f"{name} to join the cluster",
            )
        return proc

    def add_dispatcher(self) -> Proc:
        """Start one more ``overparam dispatch`` (``dispatcher-<n>``)."""
        return self._spawn(self._next("dispatcher"), "dispatcher")

    # -- faults -----------------------------------------------------------------------------

    def kill_worker(self, name: str) -> set[int]:
        """SIGKILL every process of one worker node (raylet, Ray workers running tasks, agents,
        its ``ray start``) at once, like a machine losing power; returns the pids killed."""
        proc = self.procs[name]
        assert proc.service == "ray-worker", f"{name} is not a worker node"
        return self._kill(proc)

    def kill_dispatcher(self, name: str = "dispatcher-1") -> set[int]:
        """SIGKILL one dispatcher (no graceful shutdown, no re-queueing); returns the pids."""
        proc = self.procs[name]
        assert proc.service == "dispatcher", f"{name} is not a dispatcher"
        return self._kill(proc)

    def stop(self, name: str, timeout: float = 30.0) -> int | None:
        """SIGTERM one process (as `docker compose stop` does) and wait; its exit code."""
        proc = self.procs[name]
        with contextlib.suppress(ProcessLookupError):
            proc.popen.send_signal(signal.SIGTERM)
        try:
            return proc.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self._kill(proc)
            return None

    def _kill(self, proc: Proc) -> set[int]:
        killed: set[int] = set()
        for _ in range(20):  # a process may fork while we look: repeat until none is left
            pids = (descendants(proc.pid) | marked(self._tag(proc.name))) - {os.getpid()}
            if not pids:
                break
            sigkill(pids)
            killed |= pids
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(10)
        return killed

    # -- observing --------------------------------------------------------------------------

    def nodes(self) -> list[dict[str, Any]]:
        """The cluster's nodes as Ray's state API lists them (``node_id``, ``state``,
        ``is_head_node``, ``resources_total``, ...)."""
        return self._state_api("nodes")

    def tasks(self, name: str | None = None) -> list[dict[str, Any]]:
        """Ray's record of the cluster's tasks (``name``, ``node_id``, ``state``, ...), all of
        them or those called ``name``. Only the dispatchers submit tasks here, one per run
        attempt. It lags the cluster by a second or so (task events are sent in batches)."""
        if name is None:
            return self._state_api("tasks")
        return self._state_api(
            "tasks", filter_keys="name", filter_predicates="=", filter_values=name
        )

    def _state_api(self, resource: str, **params: str) -> list[dict[str, Any]]:
        """GET /api/v0/<resource> from the head's dashboard, with the token."""
        reply = httpx.get(
            f"{self.dashboard_url}/api/v0/{resource}",
            params={"limit": "10000", "detail": "true", **params},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        reply.raise_for_status()
        return list(reply.json()["data"]["result"]["result"])

    def alive_node_ids(self) -> set[str]:
        try:
            return {n["node_id"] for n in self.nodes() if n["state"] == "ALIVE"}
        except (httpx.HTTPError, KeyError):
            return set()

    def workers_running(self, task: str | None = None) -> list[Proc]:
        """The live worker nodes on which Ray reports a task (any, or those called ``task``)
        running, about a second late: the nodes to kill to interrupt a run."""
        busy = {t["node_id"] for t in self.tasks(task) if t["state"] == "RUNNING"}
        return [p for p in self.workers() if p.alive() and p.node_id() in busy]

    def workers(self) -> list[Proc]:
        """The worker nodes started so far (killed ones included), oldest first."""
        return [p for p in self.procs.values() if p.service == "ray-worker"]

    def wait_nodes(self, workers: int, *, deadline: float | None = None) -> None:
        """Wait until the head and ``workers`` of the live worker nodes are alive in the GCS."""

        def enough() -> bool:
            alive = self.alive_node_ids()
            head = self.procs["ray-head"].node_id()
            ours = [p.node_id() for p in self.workers() if p.alive()]
            return head in alive and sum(n in alive for n in ours) >= workers

        self.wait_for(enough, deadline or time.monotonic() + 60, f"{workers} worker nodes")

    def healthcheck(self, name: str) -> subprocess.CompletedProcess[bytes]:
        """Run the compose health check of ``name``'s service against it."""
        service = self.procs[name].service
        check = SERVICES[service].healthcheck
        assert check is not None, f"{name} has no health check"
        argv = [self.addresses.render(arg) for arg in check]
        program = BIN_DIR / argv[0]
        return subprocess.run(
            [str(program) if program.exists() else argv[0], *argv[1:]],
            env=self.environment(name, service),
            cwd=self.root,
            capture_output=True,
            timeout=60,
            check=False,
        )

    def environment(self, name: str, service: str) -> dict[str, str]:
        """What the compose service's container would have: the image's environment, the
        service's own variables; nothing from the test process (no stray RAY_* or OVERPARAM_*)."""
        image_env = {
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '/usr/bin:/bin')}",
            "HOME": os.environ.get("HOME", str(self.root)),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "OVERPARAM_DATA_DIR": str(self.root / "data"),
            "OVERPARAM_CHECKPOINT_DIR": self.addresses.checkpoint_dir,
        }
        if "PYTHONPATH" in os.environ:  # which source tree runs is the caller's choice
            image_env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        compose = SERVICES[service].environment(self.addresses)
        extra = self.extra_env.get(service, {})
        return image_env | compose | extra | {MARKER: self._tag(name)}

    def tail(self, name_or_log: str | Path, lines: int = 40) -> str:
        log = name_or_log if isinstance(name_or_log, Path) else self.procs[name_or_log].log
        try:
            return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def report(self) -> str:
        """The state and last log lines of every process: attach it to a failed assertion."""
        return "\n".join(
            f"--- {p.name} (pid {p.pid}, {'alive' if p.alive() else f'exit {p.popen.returncode}'})"
            f"\n{self.tail(p.name, 15)}"
            for p in self.procs.values()
        )

    @staticmethod
    def wait_for(check: Callable[[], bool], deadline: float, what: str) -> None:
        while not check():
            if time.monotonic() > deadline:
                raise TopologyError(f"timed out waiting for {what}")
            time.sleep(0.25)

    # -- teardown ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stop everything this topology started, gracefully then by force; remove its files.
        Idempotent, and registered with atexit in case the test process dies first."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        # Dispatchers first (they cancel and re-queue their runs while Ray and the database
        # are up), then the API and the workers, the head last.
        order = ("dispatcher", "api", "ray-worker", "ray-head")
        for service in order:
            group = [p for p in self.procs.values() if p.service == service and p.alive()]
            for proc in group:
                with contextlib.suppress(ProcessLookupError):
                    proc.popen.send_signal(signal.SIGTERM)
            for proc in group:
                try:
                    proc.popen.wait(15)
                except subprocess.TimeoutExpired:
                    self._kill(proc)
        for _ in range(20):
            leftovers = marked(f"{self.id}/") - {os.getpid()}
            if not leftovers:
                break
            sigkill(leftovers)
            time.sleep(0.1)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Topology:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------

    def _tag(self, name: str) -> str:
        return f"{self.id}/{name}"

    def _next(self, service: str) -> str:
        self._counters[service] = self._counters.get(service, 0) + 1
        return f"{service}-{self._counters[service]}"

    def _spawn(self, name: str, service: str, **host: str) -> Proc:
        if self._closed:
            raise TopologyError("this topology is closed")
        host.setdefault("client_port", str(self.client_port))
        log = self.root / "logs" / f"{name}.log"
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("wb") as out:
            popen = subprocess.Popen(
                harness_argv(service, self.addresses, **host),
                env=self.environment(name, service),
                cwd=self.root,  # no stray .env: Settings reads one from the working directory
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a terminal's Ctrl-C reaches pytest only
            )
        proc = self.procs[name] = Proc(name, service, popen, log)
        return proc

    def _healthy(self, proc: Proc) -> bool:
        if not proc.alive():
            raise TopologyError(f"{proc.name} exited:\n{self.tail(proc.name)}")
        port = int(self.addresses.ray_port)
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return False
        return self.healthcheck(proc.name).returncode == 0

    def _api_ready(self) -> bool:
        if not self.procs["api"].alive():
            raise TopologyError(f"the API exited:\n{self.tail('api')}")
        try:
            return httpx.get(f"{self.base_url}/readyz", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False


# The GCS notices a killed node after ~2 s instead of Ray's default ~15 s.
FAST_NODE_DEATH = {"RAY_health_check_period_ms": "500", "RAY_health_check_failure_threshold": "3"}


@contextlib.contextmanager
def pg_topology(workers: int, dispatchers: int) -> Iterator[Topology]:
    """A started topology on a fresh PostgreSQL database; afterwards every process is gone."""
    url = create_pg_database()
    topo = Topology(
        url, workers=workers, dispatchers=dispatchers, extra_env={"ray-head": FAST_NODE_DEATH}
    )
    try:
        yield topo.start()
    finally:
        topo.close()
        drop_pg_database(url)
    assert not marked(f"{topo.id}/"), "every process of the topology is gone"
