"""The compose file's ``observability`` profile, read without Docker: Prometheus scrapes the API
with the token the API reads, through a Host name it answers; Grafana gets the data source and
the dashboard; every series the dashboard queries is one ``GET /metrics`` serves, and
docs/deploy.md lists exactly the series it serves."""

from __future__ import annotations

import json
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from api.main import create_app
from services.db import make_engine, make_sessionmaker, session_scope
from services.migrate import upgrade
from services.models import DispatcherRecord, Run, utcnow
from tests.conftest import make_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERIES = re.compile(r"\boverparam_[a-z_]+\b")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads((DEPLOY / "grafana" / "overparam.json").read_text())
    return loaded


def family(name: str) -> str:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return name.removesuffix(suffix)
    return name


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path of a service's bind mounts (relative to the repository)."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            found[target] = source
    return found


def test_prometheus_and_grafana_start_only_under_the_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["observability"], name
        for port in services[name]["ports"]:
            assert port.startswith("127.0.0.1:"), (name, port)
        for target, source in mounts(services[name]).items():
            assert (ROOT / source).exists(), (name, source, target)


def test_prometheus_scrapes_the_api_with_the_token_the_api_reads(compose: dict[str, Any]) -> None:
    services = compose["services"]
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (target,) = job["static_configs"][0]["targets"]
    host, port = target.split(":")
    assert host in services and services[host]["command"][-4:-2] == ["--port", port]
    assert host in json.loads(services["api"]["environment"]["OVERPARAM_ALLOWED_HOSTS"])
    assert job["authorization"]["type"] == "Bearer"
    # the prometheus service writes the api's token to the file Prometheus reads it from
    token = services["api"]["environment"]["OVERPARAM_METRICS_TOKEN"]
    assert services["prometheus"]["environment"] == {"METRICS_TOKEN": token}
    (script,) = services["prometheus"]["command"]
    written = f'printf %s "$$METRICS_TOKEN" > {job["authorization"]["credentials_file"]} && '
    assert written in script and script.startswith("umask 077 && ")
    assert mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == (
        "./deploy/prometheus.yml"
    )


def test_grafana_is_provisioned_with_the_data_source_and_the_dashboard(
    compose: dict[str, Any], dashboard: dict[str, Any]
) -> None:
    grafana = mounts(compose["services"]["grafana"])
    provisioning = ROOT / grafana["/etc/grafana/provisioning"]
    (source,) = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090" and source["type"] == "prometheus"
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "overparam.yml").read_text())[
        "providers"
    ]
    folder = provider["options"]["path"]
    assert grafana[f"{folder}/overparam.json"] == "./deploy/grafana/overparam.json"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and dashboard["uid"] == "overparam"
    for panel in panels:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The families ``GET /metrics`` serves with every series present: a leading dispatcher
    whose nodes have GPUs, a run, a request made."""
    url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'overparam.db'}"
    upgrade(url)
    engine = make_engine(url)
    with session_scope(make_sessionmaker(engine)) as db:
        db.add(Run(config={}, status="running", resources={"cpus": 1, "gpus": 1}))
        db.add(
            DispatcherRecord(
                id="d",
                host="h",
                pid=1,
                leader=True,
                heartbeat_at=utcnow() - timedelta(seconds=1),
                nodes=[{"CPU": 1.0, "GPU": 2.0, "memory": 1.0}],
            )
        )
    engine.dispose()
    with TestClient(create_app(make_settings(url))) as client:
        client.get("/livez")
        text = client.get("/metrics").text
    names = {f.name for f in text_string_to_metric_families(text)}
    # prometheus_client's creation times of counters and histograms are not series of ours
    return {n for n in names if n.startswith("overparam_") and not n.endswith("_created")}


def test_the_dashboard_queries_only_served_series(
    dashboard: dict[str, Any], served: set[str]
) -> None:
    queried = {
        family(name)
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        for name in SERIES.findall(target["expr"])
    }
    assert queried and queried - served == set()


def test_the_docs_list_exactly_the_served_series(served: set[str]) -> None:
    docs = (ROOT / "docs" / "deploy.md").read_text()
    listed = {family(m) for m in re.findall(r"^\| `(overparam_[a-z_]+)` \|", docs, re.M)}
    assert listed == served
