"""The Helm chart: renders with defaults and with the native sidecar on and
off, every manifest valid (kubernetes-validate --strict, the two newest
minors); a misspelled value fails; `helm lint --strict` clean; hardened defaults."""

from __future__ import annotations

import base64
from typing import Any

import helm_python as helm
import pytest

from tests.k8s.kube import CHART, manifests, newest_minors, pod_spec_of, render, validate_strict

BASE_KINDS = ["ConfigMap", "Deployment", "Secret"]  # the policy, the example app, the generated admin token
ALL_METRICS = {
    "service": {"enabled": True},
    "podMonitor": {"enabled": True},
    "serviceMonitor": {"enabled": True},
}
# values, and the kinds they render (sorted)
VARIANTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "defaults": ({}, BASE_KINDS),
    "native-sidecar-on": ({"sidekey": {"nativeSidecar": True}}, BASE_KINDS),
    "native-sidecar-off": ({"sidekey": {"nativeSidecar": False, "preStopSleepSeconds": 5}}, BASE_KINDS),
    "bare-ca-keys-as-env": ({"ca": {"bundle": False}, "providerSecrets": {"asEnv": True}}, BASE_KINDS),
    "no-provider-secret": (
        {"providerSecrets": {"existingSecret": ""}, "sidekey": {"waitForProxySeconds": 0}},
        BASE_KINDS,
    ),
    "existing-admin-token-secret": ({"adminToken": {"existingSecret": "ops-admin"}}, ["ConfigMap", "Deployment"]),
    "metrics-service-on": ({"metrics": {"service": {"enabled": True}}}, [*BASE_KINDS, "Service"]),
    "monitors-on": (
        {"metrics": ALL_METRICS},
        ["ConfigMap", "Deployment", "PodMonitor", "Secret", "Service", "ServiceMonitor"],
    ),
    "network-policy-on": ({"networkPolicy": {"enabled": True}}, ["ConfigMap", "Deployment", "NetworkPolicy", "Secret"]),
    "network-policy-with-scrapers-native": (
        {
            "sidekey": {"nativeSidecar": True},
            "networkPolicy": {
                "enabled": True,
                "providerPorts": [443, 8443],
                "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            },
        },
        ["ConfigMap", "Deployment", "NetworkPolicy", "Secret"],
    ),
}
# Prometheus Operator kinds: kubernetes-validate has no schema for CRDs, so
# the tests below assert their structure instead.
CRD_KINDS = {"PodMonitor", "ServiceMonitor"}


def test_two_newest_minors_are_distinct_and_known() -> None:
    minors = newest_minors()
    assert len(minors) == 2 and minors[0] != minors[1]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_rendered_manifest_is_valid(name: str) -> None:
    values, kinds = VARIANTS[name]
    docs = manifests(render(values))
    assert sorted(d["kind"] for d in docs) == kinds
    known = [d for d in docs if d["kind"] not in CRD_KINDS]
    checked = validate_strict(known)
    assert len(checked) == len(known) * len(newest_minors())


@pytest.mark.parametrize(
    "values",
    [
        {"sidekey": {"nativeSidecr": True}},
        {"replicaCont": 2},
        {"sidekey": {"probes": {"readiness": {"periodSecond": 5}}}},
        {"sidekey": {"port": "8080"}},
        {"ca": {"existingSecret": ""}},
        {"sidekey": {"metricPort": 9091}},
        {"metrics": {"servce": {"enabled": True}}},
        {"metrics": {"podMonitor": {"enable": True}}},
        {"metrics": {"serviceMonitor": {"interval": "30 seconds"}}},
        {"networkPolicy": {"providerPort": [443]}},
        {"networkPolicy": {"providerPorts": ["443"]}},
        {"adminToken": {"existingSecrets": "x"}},
    ],
    ids=[
        "sidekey.nativeSidecr",
        "replicaCont",
        "probes.readiness.periodSecond",
        "port-as-string",
        "empty-ca-secret",
        "sidekey.metricPort",
        "metrics.servce",
        "podMonitor.enable",
        "serviceMonitor.interval-prose",
        "networkPolicy.providerPort",
        "providerPorts-as-strings",
        "adminToken.existingSecrets",
    ],  # fmt: skip
)
def test_a_misspelled_or_mistyped_value_fails_to_render(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render(values)


def test_a_grace_budget_that_would_kill_sidekey_mid_drain_fails() -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render({"terminationGracePeriodSeconds": 30})


@pytest.mark.parametrize(
    "values",
    [{}, {"sidekey": {"nativeSidecar": True}}, {"metrics": ALL_METRICS, "networkPolicy": {"enabled": True}}],
)
def test_helm_lint_strict_is_clean(values: dict[str, Any]) -> None:
    for minor in newest_minors():
        report = helm.lint(CHART, values, strict=True, kube_version=f"v{minor}.0")
        assert report["errors"] == []
        # severity 2 is a warning, 3 an error; 1 (info: "icon is recommended") is not a finding.
        assert [m for m in report["messages"] if m["severity"] >= 2] == []


def test_lint_reports_a_misspelled_value() -> None:
    report = helm.lint(CHART, {"sidekey": {"nativeSidecr": True}}, strict=True)
    assert any("nativeSidecr" in e for e in report["errors"])


def test_kube_version_is_declared_for_the_native_sidecar() -> None:
    with helm.Chart.load(CHART) as chart:
        assert chart.metadata["kubeVersion"] == ">=1.29.0-0"


@pytest.mark.parametrize("native", [False, True])
def test_native_sidecar_switch(native: bool) -> None:
    spec = pod_spec_of(manifests(render({"sidekey": {"nativeSidecar": native}})))
    inits = [c["name"] for c in spec["initContainers"]]
    containers = [c["name"] for c in spec["containers"]]
    assert inits == (["sidekey-init", "sidekey"] if native else ["sidekey-init"])
    assert containers == (["app"] if native else ["sidekey", "app"])
    sidekey = next(c for c in spec["initContainers"] + spec["containers"] if c["name"] == "sidekey")
    assert sidekey.get("restartPolicy") == ("Always" if native else None)
    assert ("lifecycle" in sidekey) is (not native)  # postStart wait: regular mode only


def test_hardened_by_default_with_http_probes_on_the_metrics_port() -> None:
    spec = pod_spec_of(manifests(render()))
    for c in spec["initContainers"] + spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
    sidekey = next(c for c in spec["containers"] if c["name"] == "sidekey")
    assert sidekey["ports"] == [{"name": "metrics", "containerPort": 9091, "protocol": "TCP"}]
    assert sidekey["startupProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert sidekey["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert sidekey["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    args = sidekey["args"]
    assert args[args.index("--admin") + 1] == "127.0.0.1:9090"
    assert args[args.index("--metrics-listen") + 1] == "0.0.0.0:9091"
    assert spec["automountServiceAccountToken"] is False


def test_the_init_step_is_exec_form_sidekey_that_never_creates_a_ca() -> None:
    """No /bin/sh or cp: a distroless image works; `--from` refuses a missing CA."""
    spec = pod_spec_of(manifests(render()))
    (init,) = [c for c in spec["initContainers"] if c["name"] == "sidekey-init"]
    assert init["command"] == ["sidekey"]
    assert init["args"] == [
        "ca", "--certs", "/etc/sidekey/ca", "--from", "/var/run/sidekey/ca-secret", "--bundle", "/bundle/ca-bundle.pem",
    ]  # fmt: skip


@pytest.mark.parametrize("native", [False, True])
def test_the_admin_token_reaches_the_sidekey_container_only(native: bool) -> None:
    docs = manifests(render({"sidekey": {"nativeSidecar": native}}))
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert secret["metadata"]["name"] == "demo-sidekey-admin"
    token = base64.b64decode(secret["data"]["token"])
    assert len(token) == 48 and token.isalnum()
    spec = pod_spec_of(docs)
    for c in spec["initContainers"] + spec["containers"]:
        refs = [e for e in c.get("env", []) if e["name"] == "SIDEKEY_ADMIN_TOKEN"]
        if c["name"] == "sidekey":
            assert refs == [
                {
                    "name": "SIDEKEY_ADMIN_TOKEN",
                    "valueFrom": {"secretKeyRef": {"name": "demo-sidekey-admin", "key": "token"}},
                }
            ]
        else:
            assert refs == [], c["name"]
        assert "demo-sidekey-admin" not in str(c.get("envFrom", [])) + str(c.get("volumeMounts", [])), c["name"]
    assert "demo-sidekey-admin" not in str(spec["volumes"])


def test_an_existing_admin_token_secret_is_used_and_none_generated() -> None:
    docs = manifests(render({"adminToken": {"existingSecret": "ops-admin", "key": "admin"}}))
    assert [d for d in docs if d["kind"] == "Secret"] == []
    sidekey = next(c for c in pod_spec_of(docs)["containers"] if c["name"] == "sidekey")
    (ref,) = [e for e in sidekey["env"] if e["name"] == "SIDEKEY_ADMIN_TOKEN"]
    assert ref["valueFrom"]["secretKeyRef"] == {"name": "ops-admin", "key": "admin"}


def pod_labels(docs: list[dict[str, Any]]) -> dict[str, str]:
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    labels: dict[str, str] = deploy["spec"]["template"]["metadata"]["labels"]
    return labels


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def test_monitors_and_the_metrics_service_select_the_sidekey_pods_on_the_metrics_port() -> None:
    docs = manifests(
        render({"metrics": {**ALL_METRICS, "podMonitor": {"enabled": True, "labels": {"release": "kps"}}}})
    )
    by_kind = {d["kind"]: d for d in docs}
    labels = pod_labels(docs)
    service = by_kind["Service"]
    assert selects(service["spec"]["selector"], labels)
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 9091, "targetPort": "metrics", "protocol": "TCP"}]
    pod_monitor, service_monitor = by_kind["PodMonitor"], by_kind["ServiceMonitor"]
    for monitor in (pod_monitor, service_monitor):
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        assert monitor["metadata"]["name"] == "demo-sidekey"
    assert pod_monitor["metadata"]["labels"]["release"] == "kps"
    assert selects(pod_monitor["spec"]["selector"]["matchLabels"], labels)
    assert pod_monitor["spec"]["podMetricsEndpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    assert selects(service_monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert service_monitor["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics", "interval": "30s"}]
    # the port names the monitors and the Service use exist on the sidekey container
    sidekey = next(c for c in pod_spec_of(docs)["containers"] if c["name"] == "sidekey")
    assert [p["name"] for p in sidekey["ports"]] == ["metrics"]


def test_a_service_monitor_without_the_service_fails_to_render() -> None:
    with pytest.raises(helm.HelmRenderError, match="metrics.service.enabled"):
        render({"metrics": {"serviceMonitor": {"enabled": True}}})


def test_the_network_policy_allows_dns_the_provider_ports_and_scrapers_only() -> None:
    scrapers = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]
    docs = manifests(
        render({"networkPolicy": {"enabled": True, "providerPorts": [443, 8443], "metricsFrom": scrapers}})
    )
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    spec = policy["spec"]
    assert selects(spec["podSelector"]["matchLabels"], pod_labels(docs))
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [{"from": scrapers, "ports": [{"port": "metrics", "protocol": "TCP"}]}]
    dns, providers = spec["egress"]
    assert dns["to"] == [
        {
            "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
            "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
        }
    ]
    assert dns["ports"] == [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]
    assert providers == {
        "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
        "ports": [{"port": 443, "protocol": "TCP"}, {"port": 8443, "protocol": "TCP"}],
    }


def test_the_network_policy_without_scrapers_admits_nothing() -> None:
    (policy,) = [d for d in manifests(render({"networkPolicy": {"enabled": True}})) if d["kind"] == "NetworkPolicy"]
    assert policy["spec"]["ingress"] == []


def test_the_app_never_mounts_a_key() -> None:
    spec = pod_spec_of(manifests(render()))
    app = next(c for c in spec["containers"] if c["name"] == "app")
    mounted = {m["name"] for m in app["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounted == {"sidekey-ca-cert", "sidekey-bundle"}
    assert volumes["sidekey-ca-cert"]["secret"]["items"] == [{"key": "sidekey-ca.pem", "path": "sidekey-ca.pem"}]
    assert "envFrom" not in app


def test_the_example_app_can_be_switched_off() -> None:
    # The admin token Secret stays: a chart that includes sidekey.sidecar may use it.
    docs = manifests(render({"app": {"enabled": False}, "metrics": ALL_METRICS, "networkPolicy": {"enabled": True}}))
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Secret"]
