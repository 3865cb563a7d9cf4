"""deploy/k8s describes the stack of tests/deploy/stack.py, as docker-compose.yml does: the same
services, commands, environment, health checks, ports, shared memory, GPUs, checkpoint volume
and start order. No cluster needed: the kustomizations are rendered here (they use nothing but
``resources``), every object is validated against Kubernetes' own JSON schemas (the
kubernetes-validate package, strict: unknown fields fail) and the RayCluster against KubeRay's
(tests/deploy/raycluster.schema.json, with Kubernetes' PodTemplateSpec inside). Where kubectl
is installed, its kustomize must render the same objects."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from referencing import Registry, Resource

from tests.deploy.stack import KUBERNETES, SERVICES, Service

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
KUSTOMIZATIONS = ("base", "with-postgres")
RAYCLUSTER_SCHEMA = Path(__file__).with_name("raycluster.schema.json")
# The oldest and the newest Kubernetes that kubernetes-validate ships schemas for, from 1.29
# (KubeRay 1.5's oldest supported release) on.
KUBERNETES_VERSIONS = (
    "1.29",
    kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version()),
)
IMAGE = "overparam:latest"  # a lab's overlay replaces it (kustomize `images:`)
SECRET = "overparam"
SECRET_KEYS = {"database-url", "auth_token", "metrics-token", "postgres-password"}
CLUSTER = "overparam"  # the RayCluster; KubeRay names its head's Service "<name>-head-svc"
PVC = "overparam-checkpoints"
# compose `depends_on` -> the init container that waits for the same condition, and its script
WAIT_FOR_MIGRATION = (
    "until python -c 'import os, sys; from services.migrate import is_current; "
    'sys.exit(not is_current(os.environ["OVERPARAM_DATABASE_URL"]))\' 2>/dev/null; '
    'do echo "waiting for job/overparam-migrate"; sleep 5; done'
)
WAIT_FOR_RAY_HEAD = (
    "until ray health-check --address={ray_address}; "
    'do echo "waiting for the Ray head"; sleep 5; done'
)


def render(directory: Path) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize DIRECTORY`` prints, for kustomizations that only list
    ``resources`` (files, or directories with a kustomization of their own)."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "resources"}
    if unsupported:
        raise ValueError(f"{directory}: only `resources` is rendered here, not {unsupported}")
    objects: list[dict[str, Any]] = []
    for entry in kustomization["resources"]:
        path = (directory / entry).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [obj for obj in yaml.safe_load_all(path.read_text()) if obj]
    return objects


@pytest.fixture(scope="module")
def base() -> list[dict[str, Any]]:
    return render(K8S / "base")


def find(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    (found,) = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    return found


def pod_templates(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = obj.get("spec", {})
    if obj["kind"] == "RayCluster":
        yield spec["headGroupSpec"]["template"]
        for group in spec.get("workerGroupSpecs", []):
            yield group["template"]
    elif obj["kind"] == "Job" or "template" in spec:
        yield spec["template"]


def containers(obj: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for template in pod_templates(obj):
        yield from template["spec"].get("initContainers", [])
        yield from template["spec"]["containers"]


# -- each service of the stack is a workload here ---------------------------------------------


def workload(objects: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(pod spec, the service's container) of stack service NAME."""
    if name in ("ray-head", "ray-worker"):
        spec = find(objects, "RayCluster", CLUSTER)["spec"]
        group = spec["headGroupSpec"] if name == "ray-head" else ray_worker_group(objects)
        pod = group["template"]["spec"]
    else:
        kind = "Job" if name == "migrate" else "Deployment"
        pod = find(objects, kind, f"overparam-{name}")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == name]
    return pod, container


def ray_worker_group(objects: list[dict[str, Any]]) -> dict[str, Any]:
    (group,) = find(objects, "RayCluster", CLUSTER)["spec"]["workerGroupSpecs"]
    found: dict[str, Any] = group
    return found


def kuberay_start(params: dict[str, str], *, head: bool) -> list[str]:
    """The ``ray start`` KubeRay runs for a group with these rayStartParams (KubeRay 1.x,
    controllers/ray/common/pod.go: setMissingRayStartParams, convertParamMap): ``--head`` or
    ``--address=<the head's Service>:<port>``, ``--block``, each param as ``--name=value``, a
    "true" one as a bare ``--name``. (KubeRay also sets its metrics and dashboard-agent ports,
    which compose leaves at Ray's defaults.)"""
    params = dict(params) | {"block": "true"}
    if not head:
        params.setdefault("address", KUBERNETES.ray_address)
    flags = [f"--{k}" if v == "true" else f"--{k}={v}" for k, v in params.items() if v != "false"]
    return ["ray", "start", *(["--head"] if head else []), *flags]


def command(objects: list[dict[str, Any]], name: str) -> list[str]:
    if name == "ray-head":
        head = find(objects, "RayCluster", CLUSTER)["spec"]["headGroupSpec"]
        return kuberay_start(head["rayStartParams"], head=True)
    if name == "ray-worker":
        return kuberay_start(ray_worker_group(objects)["rayStartParams"], head=False)
    found: list[str] = workload(objects, name)[1]["command"]
    return found


def environment(container: dict[str, Any]) -> dict[str, str]:
    """NAME -> value, or "secret:NAME/KEY" for a value from a Secret (stack.KUBERNETES)."""
    env = {}
    for var in container.get("env", []):
        if "valueFrom" in var:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = f"secret:{ref['name']}/{ref['key']}"
        else:
            env[var["name"]] = var["value"]
    return env


def quantity(compose_size: str) -> str:
    """compose's shm_size ("1gb", "${VAR:-8gb}") as a Kubernetes quantity ("1Gi", "8Gi")."""
    size = re.sub(r"^\$\{[A-Z_]+:-(.*)\}$", r"\1", compose_size)
    number, unit = re.fullmatch(r"(\d+)([kmg])b", size).groups()  # type: ignore[union-attr]
    return f"{number}{unit.upper()}i"


def mounts(pod: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mount path -> the volume mounted there."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]] for m in container.get("volumeMounts", [])}


def test_the_workloads_are_the_stack(base: list[dict[str, Any]]) -> None:
    names = {
        o["metadata"]["name"] for o in base if o["kind"] in ("Deployment", "Job", "StatefulSet")
    }
    assert names == {f"overparam-{n}" for n in SERVICES if not n.startswith("ray-")}
    assert [o["metadata"]["name"] for o in base if o["kind"] == "RayCluster"] == [CLUSTER]
    for name in SERVICES:
        workload(base, name)


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_each_workload_matches_the_stack_description(name: str, base: list[dict[str, Any]]) -> None:
    spec = SERVICES[name]
    pod, container = workload(base, name)
    if spec.command[:2] == ("ray", "start"):
        assert sorted(command(base, name)) == sorted(spec.argv(KUBERNETES))
    else:
        assert command(base, name) == spec.compose_command(KUBERNETES)
    assert environment(container) == spec.environment(KUBERNETES)
    assert {c["image"] for c in containers_of(pod)} == {IMAGE}, "one image for every process"
    check_health(spec, container)
    ports = {str(p["containerPort"]) for p in container.get("ports", [])}
    assert {KUBERNETES.render(port) for _, port in spec.publish} <= ports
    at = mounts(pod, container)
    if spec.shm_size is None:
        assert "/dev/shm" not in at
    else:
        shm = at["/dev/shm"]["emptyDir"]
        assert shm == {"medium": "Memory", "sizeLimit": quantity(spec.shm_size)}
    gpus = container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    assert gpus == (KUBERNETES.worker_gpus if spec.gpus else None)
    checkpoints = at.get(KUBERNETES.checkpoint_dir)
    if spec.checkpoints:
        assert checkpoints == {"name": "checkpoints", "persistentVolumeClaim": {"claimName": PVC}}
    else:
        assert checkpoints is None
    check_start_order(name, spec, pod, base)


def containers_of(pod: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = pod.get("initContainers", []) + pod["containers"]
    return found


def check_health(spec: Service, container: dict[str, Any]) -> None:
    """compose's health check is the readiness probe (the API: /readyz; /livez for liveness);
    a service without one has no probes."""
    if spec.healthcheck is None:
        assert not {"readinessProbe", "livenessProbe"} & set(container)
        return
    rendered = [KUBERNETES.render(arg) for arg in spec.healthcheck]
    url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", " ".join(rendered))
    if url is None:
        for probe in ("readinessProbe", "livenessProbe"):
            assert container[probe]["exec"]["command"] == rendered
        return
    port, path = url.groups()
    named = {p["name"]: str(p["containerPort"]) for p in container["ports"]}
    for probe, probe_path in (("readinessProbe", path), ("livenessProbe", "/livez")):
        get = container[probe]["httpGet"]
        assert get["path"] == probe_path and named[get["port"]] == port


def check_start_order(
    name: str, spec: Service, pod: dict[str, Any], objects: list[dict[str, Any]]
) -> None:
    """compose's depends_on: the migration waits for PostgreSQL by retrying (a Job), the others
    wait in init containers; KubeRay's workers wait for the head in its own init container."""
    expected = {}  # init container -> (its script, the service it waits for)
    for dependency, condition in spec.depends_on.items():
        if (dependency, condition) == ("postgres", "service_healthy"):
            assert find(objects, "Job", f"overparam-{name}")["spec"]["backoffLimit"] > 0
        elif (dependency, condition) == ("migrate", "service_completed_successfully"):
            expected["wait-for-migration"] = (WAIT_FOR_MIGRATION, dependency)
        elif (dependency, condition) == ("ray-head", "service_healthy"):
            if name != "ray-worker":
                expected["wait-for-ray-head"] = (KUBERNETES.render(WAIT_FOR_RAY_HEAD), dependency)
        else:
            raise AssertionError(f"no Kubernetes form of {name} depends_on {dependency}")
    init = {c["name"]: c for c in pod.get("initContainers", [])}
    assert set(init) == set(expected)
    for wait, (script, dependency) in expected.items():
        assert init[wait]["command"] == ["sh", "-c", script]
        # the service's own environment, or what the service it waits for gets
        allowed = spec.environment(KUBERNETES) | SERVICES[dependency].environment(KUBERNETES)
        assert environment(init[wait]).items() <= allowed.items()


# -- what docs/deploy.md promises ---------------------------------------------------------


def test_the_dispatcher_runs_a_standby(base: list[dict[str, Any]]) -> None:
    dispatcher = find(base, "Deployment", "overparam-dispatcher")
    assert dispatcher["spec"]["replicas"] == 2, "a leader and a standby on the advisory lock"


def test_the_api_is_ready_on_readyz_and_alive_on_livez(base: list[dict[str, Any]]) -> None:
    _, api = workload(base, "api")
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/livez"
    service = find(base, "Service", "overparam-api")
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]
    assert (
        service["spec"]["selector"]
        == find(base, "Deployment", "overparam-api")["spec"]["selector"]["matchLabels"]
    )


def test_the_ray_head_runs_no_work_and_workers_announce_their_gpus(
    base: list[dict[str, Any]],
) -> None:
    head = find(base, "RayCluster", CLUSTER)["spec"]["headGroupSpec"]["rayStartParams"]
    assert head["num-cpus"] == head["num-gpus"] == "0"
    worker = ray_worker_group(base)
    _, container = workload(base, "ray-worker")
    resources = container["resources"]
    assert worker["rayStartParams"]["num-gpus"] == resources["limits"]["nvidia.com/gpu"]
    assert worker["rayStartParams"]["num-cpus"] == resources["requests"]["cpu"]
    assert KUBERNETES.ray_address == f"{CLUSTER}-head-svc:{head['port']}"


def test_the_ray_version_is_the_pinned_one(base: list[dict[str, Any]]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "ray[default]>=2.60,<2.61" in project["dependencies"]
    assert find(base, "RayCluster", CLUSTER)["spec"]["rayVersion"].startswith("2.60.")


def test_every_ray_process_has_the_token_from_the_secret(base: list[dict[str, Any]]) -> None:
    cluster = find(base, "RayCluster", CLUSTER)
    assert cluster["spec"]["authOptions"] == {"mode": "token", "secretName": SECRET}
    token = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": f"secret:{SECRET}/auth_token"}
    for obj in base:
        for container in containers(obj):
            env = environment(container)
            talks_to_ray = "ray " in " ".join(container.get("command", [])) or (
                obj["kind"] == "RayCluster"
            )
            if talks_to_ray:
                assert token.items() <= env.items(), container["name"]
            else:
                assert not any(k.startswith("RAY_AUTH") for k in env), container["name"]


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_secrets_come_only_from_the_secret(kustomization: str) -> None:
    objects = render(K8S / kustomization)
    assert not [o for o in objects if o["kind"] == "Secret"], "the lab creates it (docs)"
    refs = set()
    for obj in objects:
        for container in containers(obj):
            for var in container.get("env", []):
                if "valueFrom" in var:
                    ref = var["valueFrom"]["secretKeyRef"]
                    refs.add((ref["name"], ref["key"]))
                elif re.search("PASSWORD|TOKEN|DATABASE_URL", var["name"]):
                    raise AssertionError(f"{container['name']}: {var['name']} in clear")
    assert {name for name, _ in refs} == {SECRET}
    assert {key for _, key in refs} <= SECRET_KEYS


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_nothing_is_exposed_outside_the_cluster(kustomization: str) -> None:
    """Like compose's ports on 127.0.0.1: ClusterIP Services only, no host ports."""
    objects = render(K8S / kustomization)
    for obj in objects:
        if obj["kind"] == "Service":
            assert obj["spec"].get("type", "ClusterIP") == "ClusterIP", obj["metadata"]["name"]
        if obj["kind"] == "RayCluster":
            assert obj["spec"]["headGroupSpec"]["serviceType"] == "ClusterIP"
        for template in pod_templates(obj):
            assert not template["spec"].get("hostNetwork")
            for container in template["spec"]["containers"]:
                assert all("hostPort" not in p for p in container.get("ports", []))


def test_postgres_is_the_compose_service() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["postgres"]
    objects = render(K8S / "with-postgres")
    statefulset = find(objects, "StatefulSet", "postgres")
    pod = statefulset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == compose["image"]
    env = environment(container)
    assert env.pop("POSTGRES_PASSWORD") == f"secret:{SECRET}/postgres-password"
    assert env.pop("PGDATA").startswith("/var/lib/postgresql/data/")
    expected = {k: v for k, v in compose["environment"].items() if k != "POSTGRES_PASSWORD"}
    assert env == expected
    for probe in ("readinessProbe", "livenessProbe"):
        assert ["CMD", *container[probe]["exec"]["command"]] == compose["healthcheck"]["test"]
    (volume,) = compose["volumes"]
    (mount,) = container["volumeMounts"]
    assert f"{mount['name']}:{mount['mountPath']}" == volume
    service = find(objects, "Service", "postgres")
    assert service["spec"]["ports"][0]["port"] == 5432
    assert (
        "@postgres:5432/overparam"
        in yaml.safe_load((ROOT / "docker-compose.yml").read_text())["x-overparam"]["database-env"][
            "OVERPARAM_DATABASE_URL"
        ]
    ), "the URL compose uses works"


# -- schemas ----------------------------------------------------------------------------------


def kubernetes_definitions(version: str) -> Resource[Any]:
    path = f"kubernetes-json-schema/v{version}.0-local-strict/_definitions.json"
    contents = kubernetes_validate.utils.schema_contents(path, version)
    return Resource.from_contents(contents)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_object_validates_against_the_kubernetes_schema(
    kustomization: str, version: str
) -> None:
    for obj in render(K8S / kustomization):
        if obj["kind"] != "RayCluster":
            kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_the_raycluster_validates_against_the_kuberay_schema(
    base: list[dict[str, Any]], version: str
) -> None:
    schema = json.loads(RAYCLUSTER_SCHEMA.read_text())
    registry: Registry[Any] = kubernetes_definitions(version) @ Registry()
    validator = jsonschema.Draft202012Validator(schema, registry=registry)
    validator.validate(find(base, "RayCluster", CLUSTER))
    broken = find(base, "RayCluster", CLUSTER) | {"spec": {"headGroupSpec": {"tmplate": {}}}}
    assert not validator.is_valid(broken), "the schema is closed: a misspelt field fails"


# -- kubectl, where there is one --------------------------------------------------------------


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_kubectl_kustomize_renders_the_same_objects(kustomization: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on this machine")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rendered = [obj for obj in yaml.safe_load_all(out) if obj]

    def key(obj: dict[str, Any]) -> str:
        return json.dumps(obj, sort_keys=True)

    assert sorted(map(key, rendered)) == sorted(map(key, render(K8S / kustomization)))
