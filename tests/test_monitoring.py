"""deploy/monitoring: the Grafana dashboard, the ServiceMonitor and the alert rules parse,
are well formed, and name only metrics that a running coordinator's /metrics exposes."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from quotagate.coordinator import metrics
from quotagate.coordinator.app import create_app
from quotagate.coordinator.embedded import EmbeddedServer
from quotagate.coordinator.settings import Settings

from .conftest import TEST_POLICIES, _wipe
from .service import serve_in_thread

MONITORING = Path(__file__).parent.parent / "deploy" / "monitoring"
KUBERNETES = Path(__file__).parent.parent / "deploy" / "kubernetes" / "base" / "coordinator.yaml"
METRIC = re.compile(r"\bquotagate_[a-z_]+\b")
SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")

# The parts of the Prometheus Operator's CRD schemas that these files use: enough to catch
# a misspelt or misplaced field (kubernetes-validate knows the core kinds only).
SERVICE_MONITOR = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {"type": "object", "required": ["name"]},
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "matchLabels": {
                            "type": "object",
                            "additionalProperties": {"type": "string"},
                        },
                        "matchExpressions": {"type": "array"},
                    },
                },
                "namespaceSelector": {"type": "object"},
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string"},
                            "interval": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": r"^\d+(ms|s|m|h)$"},
                            "scheme": {"enum": ["http", "https"]},
                        },
                    },
                },
            },
        },
    },
}
POD_MONITOR = {
    **SERVICE_MONITOR,
    "properties": {
        **SERVICE_MONITOR["properties"],
        "kind": {"const": "PodMonitor"},
        "spec": {
            "type": "object",
            "required": ["selector", "podMetricsEndpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": SERVICE_MONITOR["properties"]["spec"]["properties"]["selector"],
                "podMetricsEndpoints": SERVICE_MONITOR["properties"]["spec"]["properties"][
                    "endpoints"
                ],
            },
        },
    },
}
RULE = {
    "type": "object",
    "required": ["alert", "expr"],
    "additionalProperties": False,
    "properties": {
        "alert": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_]*$"},
        "expr": {"type": "string"},
        "for": {"type": "string", "pattern": r"^\d+(s|m|h)$"},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
PROMETHEUS_RULE = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PrometheusRule"},
        "spec": {
            "type": "object",
            "required": ["groups"],
            "properties": {
                "groups": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["name", "rules"],
                        "properties": {"rules": {"type": "array", "items": RULE}},
                    },
                }
            },
        },
    },
}


def load(name: str) -> Any:
    text = (MONITORING / name).read_text()
    return json.loads(text) if name.endswith(".json") else yaml.safe_load(text)


def validate(document: dict[str, Any], schema: dict[str, Any]) -> None:
    """kubernetes-validate when it knows the kind; the operator's schema subset else."""
    try:
        kubernetes_validate.validate(document, kubernetes_validate.latest_version(), strict=True)
    except kubernetes_validate.utils.SchemaNotFoundError:
        jsonschema.validate(document, schema)


def expressions() -> list[str]:
    found = [
        target["expr"]
        for panel in load("grafana-dashboard.json")["panels"]
        for target in panel["targets"]
    ]
    found += [
        variable["query"]["query"]
        for variable in load("grafana-dashboard.json")["templating"]["list"]
        if variable["type"] == "query"
    ]
    for group in load("alerts.yaml")["spec"]["groups"]:
        found += [rule["expr"] for rule in group["rules"]]
    return found


def manifest(kind: str, name: str) -> dict[str, Any]:
    docs = yaml.safe_load_all(KUBERNETES.read_text())
    found: dict[str, Any] = next(
        d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name
    )
    return found


def test_the_podmonitor_scrapes_the_coordinators_pods() -> None:
    monitor = load("podmonitor.yaml")
    jsonschema.validate(monitor, POD_MONITOR)
    pods = manifest("Deployment", "quotagate")["spec"]["template"]
    ports = {p["name"] for c in pods["spec"]["containers"] for p in c.get("ports", ())}
    assert {e["port"] for e in monitor["spec"]["podMetricsEndpoints"]} <= ports
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pods["metadata"]["labels"].items()


def test_the_servicemonitor_scrapes_the_services_port() -> None:
    monitor = load("servicemonitor.yaml")
    validate(monitor, SERVICE_MONITOR)
    service = manifest("Service", "quotagate")
    ports = {port["name"] for port in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= ports
    assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_the_alert_rules_are_well_formed() -> None:
    rules = load("alerts.yaml")
    validate(rules, PROMETHEUS_RULE)
    names = [rule["alert"] for group in rules["spec"]["groups"] for rule in group["rules"]]
    assert len(names) == len(set(names))
    joined = " ".join(expressions())
    for needed in ("quotagate_cooldowns_active", "quotagate_learned_limits"):
        assert needed in joined
    assert "quotagate_store_errors_total" in joined


def test_the_dashboard_is_a_grafana_dashboard() -> None:
    dashboard = load("grafana-dashboard.json")
    assert dashboard["title"] and dashboard["uid"] and dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"])
    for expr in expressions():
        assert expr.count("(") == expr.count(")"), expr
        assert expr.count("{") == expr.count("}"), expr


@pytest.fixture
def exposed(valkey_server: EmbeddedServer, tmp_path: Path) -> Iterator[set[str]]:
    """Every metric name (families and samples) of a coordinator's /metrics after a
    grant, a denial, a throttled release and a learned limit."""
    _wipe(valkey_server.url)
    policy_file = tmp_path / "policies.yaml"
    policy_file.write_text(TEST_POLICIES)
    settings = Settings(redis_url=valkey_server.url, policies=policy_file)
    with serve_in_thread(create_app(settings)) as url, httpx.Client(base_url=url) as http:
        lease = http.post("/v1/leases", json={"tenant": "mon/t", "api": "single"}).json()
        http.post("/v1/leases", json={"tenant": "mon/t", "api": "single"})
        release = {"outcome": "throttled", "status_code": 429, "retry_after": 5}
        http.post(f"/v1/leases/{lease['lease_id']}/release", json=release)
        metrics.learned_limit_changed("mon/t", "single", "calls", 0.3, 1, configured=1)
        text = http.get("/metrics").text
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(sample.name for sample in family.samples)
    yield names


@pytest.mark.server
def test_every_metric_named_in_deploy_is_exposed(exposed: set[str]) -> None:
    for expr in expressions():
        for name in METRIC.findall(expr):
            bare = name
            for suffix in SUFFIXES:
                bare = bare.removesuffix(suffix)
            assert name in exposed or bare in exposed, (name, expr)
