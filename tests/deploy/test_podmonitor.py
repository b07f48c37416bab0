"""The PodMonitor example and the metrics relay's patch: the patched Deployments validate, the
relay is locked down like the broker, and the PodMonitor scrapes the relay's port.

kubernetes-validate has no schema for the Prometheus Operator's PodMonitor (a custom
resource), so its structure is checked here field by field against the operator's
monitoring.coreos.com/v1 API.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.deploy.test_manifests import KUBERNETES_VERSIONS, VARIANTS, containers, manifests

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "deploy" / "kubernetes" / "podmonitor"
PODMONITOR = MONITORING / "podmonitor.yaml"
PATCH = MONITORING / "metrics-relay.patch.yaml"
RULES = REPO / "deploy" / "prometheus" / "token-broker.rules.yml"
RELAY = "metrics-relay"
SKIP_CONTAINERS = "azure.workload.identity/skip-containers"
# The fields of monitoring.coreos.com/v1 PodMonitor's spec and of one podMetricsEndpoint
# (Prometheus Operator API reference, v0.7x).
PODMONITOR_SPEC = {
    "jobLabel", "podTargetLabels", "podMetricsEndpoints", "selector", "namespaceSelector",
    "sampleLimit", "targetLimit", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeProtocols",
    "scrapeClass", "bodySizeLimit", "fallbackScrapeProtocol", "selectorMechanism",
    "scrapeClassicHistograms", "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor",
    "convertClassicHistogramsToNHCB",
}  # fmt: skip
ENDPOINT = {
    "port", "portNumber", "targetPort", "path", "scheme", "params", "interval",
    "scrapeTimeout", "honorLabels", "honorTimestamps", "trackTimestampsStaleness",
    "metricRelabelings", "relabelings", "proxyUrl", "followRedirects", "enableHttp2",
    "filterRunning", "authorization", "basicAuth", "oauth2", "bearerTokenSecret",
    "tlsConfig", "noProxy", "proxyFromEnvironment", "proxyConnectHeader",
}  # fmt: skip
API = ("monitoring.coreos.com/v1", "PodMonitor")
TOP_LEVEL = {"apiVersion", "kind", "metadata", "spec"}
DURATION = re.compile(r"(\d+(ms|s|m|h))+")

Manifest = dict[str, Any]


def load(path: Path) -> Manifest:
    [doc] = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    loaded: Manifest = doc
    return loaded


def merged(target: Any, patch: Any) -> Any:
    """A strategic-merge patch as kubectl applies it to what these files hold: maps merge,
    lists of named items merge by name, anything else is replaced."""
    if isinstance(target, dict) and isinstance(patch, dict):
        out = dict(target)
        for key, value in patch.items():
            out[key] = merged(target[key], value) if key in target else value
        return out
    if isinstance(target, list) and isinstance(patch, list) and all("name" in p for p in patch):
        out_list = list(target)
        for item in patch:
            at = next((i for i, t in enumerate(out_list) if t["name"] == item["name"]), None)
            if at is None:
                out_list.append(item)
            else:
                out_list[at] = merged(out_list[at], item)
        return out_list
    return patch


def patched(variant: str) -> Manifest:
    deployment: Manifest = merged(copy.deepcopy(manifests(variant)["Deployment"]), load(PATCH))
    return deployment


def relay(variant: str) -> Manifest:
    containers: list[Manifest] = patched(variant)["spec"]["template"]["spec"]["containers"]
    [found] = [c for c in containers if c["name"] == RELAY]
    return found


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_patched_deployment_validates(variant: str, version: str) -> None:
    """Each variant's Deployment with the relay added is valid, with no unknown field."""
    deployment = patched(variant)
    names = [c["name"] for c in deployment["spec"]["template"]["spec"]["containers"]]
    assert names == ["scorer", RELAY]
    kubernetes_validate.validate(deployment, version, strict=True)


@pytest.mark.parametrize("variant", VARIANTS)
def test_relay_is_locked_down_like_the_broker(variant: str) -> None:
    """The relay runs the broker's image as its user, with the same sandbox, no mount, no
    environment and one port, `metrics`."""
    broker, _ = containers(variant)
    mine = relay(variant)
    assert mine["image"] == broker["image"]
    assert mine["securityContext"] == broker["securityContext"]
    assert mine["command"][:4] == ["python", "-I", "-S", "-c"]
    assert "volumeMounts" not in mine and "env" not in mine and "envFrom" not in mine
    assert mine["ports"] == [{"name": "metrics", "containerPort": 9765, "protocol": "TCP"}]
    assert mine["resources"]["limits"]["memory"]


def test_workload_identity_token_stays_out_of_the_relay() -> None:
    """The webhook skips every container but the broker: the relay gets no federated token."""
    deployment = patched("workload-identity")
    template = deployment["spec"]["template"]
    skipped = set(template["metadata"]["annotations"][SKIP_CONTAINERS].split(";"))
    everyone = {c["name"] for c in template["spec"]["containers"]}
    assert skipped == everyone
    assert "token-broker" not in skipped


def podmonitor_problems(monitor: Manifest) -> list[str]:
    """What in `monitor` is not a PodMonitor of monitoring.coreos.com/v1."""
    wrong = []
    if (monitor.get("apiVersion"), monitor.get("kind")) != API:
        wrong.append("not a monitoring.coreos.com/v1 PodMonitor")
    wrong += [f"unknown field {key}" for key in sorted(set(monitor) - TOP_LEVEL)]
    if not monitor.get("metadata", {}).get("name"):
        wrong.append("metadata.name is missing")
    spec = monitor.get("spec", {})
    wrong += [f"unknown field spec.{key}" for key in sorted(set(spec) - PODMONITOR_SPEC)]
    if not spec.get("selector", {}).get("matchLabels"):
        wrong.append("spec.selector.matchLabels is missing")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        return [*wrong, "spec.podMetricsEndpoints is missing"]
    for i, endpoint in enumerate(endpoints):
        where = f"spec.podMetricsEndpoints[{i}]"
        wrong += [f"unknown field {where}.{key}" for key in sorted(set(endpoint) - ENDPOINT)]
        for key in ("interval", "scrapeTimeout"):
            if key in endpoint and not DURATION.fullmatch(str(endpoint[key])):
                wrong.append(f"{where}.{key} is not a Prometheus duration")
        if endpoint.get("scheme", "http") not in ("http", "https"):
            wrong.append(f"{where}.scheme must be http or https")
    return wrong


def test_podmonitor_is_a_valid_podmonitor() -> None:
    """Known fields only, a label selector, endpoints with valid durations and scheme."""
    assert podmonitor_problems(load(PODMONITOR)) == []


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda m: m["spec"].update(podMetricEndpoints=[]),
            "unknown field spec.podMetricEndpoints",
        ),
        (
            lambda m: m["spec"]["podMetricsEndpoints"][0].update(interval="30"),
            "not a Prometheus duration",
        ),
        (lambda m: m["spec"]["podMetricsEndpoints"][0].update(prot="metrics"), "unknown field"),
        (
            lambda m: m.update(apiVersion="monitoring.coreos.com/v1alpha1"),
            "not a monitoring.coreos",
        ),
        (lambda m: m["spec"].pop("selector"), "selector.matchLabels is missing"),
    ],
)
def test_the_podmonitor_check_is_not_vacuous(change: Any, problem: str) -> None:
    """A misspelt field, a bad duration, a wrong API version or no selector is reported."""
    monitor = load(PODMONITOR)
    change(monitor)
    assert any(problem in each for each in podmonitor_problems(monitor))


@pytest.mark.parametrize("variant", VARIANTS)
def test_podmonitor_scrapes_the_relay_of_the_apps_pods(variant: str) -> None:
    """The selector matches the Deployment's pods, and the endpoint is the relay's port and
    the path it answers."""
    spec = load(PODMONITOR)["spec"]
    labels = patched(variant)["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = spec["podMetricsEndpoints"]
    assert endpoint["port"] == relay(variant)["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    assert "namespaceSelector" not in spec  # the app's own namespace only


def test_podmonitor_job_is_the_one_the_alert_rules_watch() -> None:
    """Prometheus names the job `<namespace>/<name>`; TokenBrokerDown's selector matches it."""
    monitor = load(PODMONITOR)
    rules = yaml.safe_load(RULES.read_text())
    [down] = [r for g in rules["groups"] for r in g["rules"] if r.get("alert") == "TokenBrokerDown"]
    found = re.search(r'job=~"([^"]+)"', down["expr"])
    assert found is not None
    assert re.fullmatch(found.group(1), f"shop/{monitor['metadata']['name']}")
    assert re.fullmatch(found.group(1), "token-broker")
    assert not re.fullmatch(found.group(1), "shop/token-broker-other")
