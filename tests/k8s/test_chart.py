"""The Helm chart: renders with defaults and with the native sidecar on and
off, every manifest valid (kubernetes-validate --strict, the two newest
minors); a misspelled value fails; `helm lint --strict` clean; hardened defaults."""

from __future__ import annotations

from typing import Any

import helm_python as helm
import pytest

from tests.k8s.kube import CHART, manifests, newest_minors, pod_spec_of, render, validate_strict

VARIANTS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "native-sidecar-on": {"sidekey": {"nativeSidecar": True}},
    "native-sidecar-off": {"sidekey": {"nativeSidecar": False, "preStopSleepSeconds": 5}},
    "bare-ca-keys-as-env": {"ca": {"bundle": False}, "providerSecrets": {"asEnv": True}},
    "no-provider-secret": {"providerSecrets": {"existingSecret": ""}, "sidekey": {"waitForProxySeconds": 0}},
}


def test_two_newest_minors_are_distinct_and_known() -> None:
    minors = newest_minors()
    assert len(minors) == 2 and minors[0] != minors[1]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_rendered_manifest_is_valid(name: str) -> None:
    docs = manifests(render(VARIANTS[name]))
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment"]
    checked = validate_strict(docs)
    assert len(checked) == 2 * len(newest_minors())


@pytest.mark.parametrize(
    "values",
    [
        {"sidekey": {"nativeSidecr": True}},
        {"replicaCont": 2},
        {"sidekey": {"probes": {"readiness": {"periodSecond": 5}}}},
        {"sidekey": {"port": "8080"}},
        {"ca": {"existingSecret": ""}},
    ],
    ids=["sidekey.nativeSidecr", "replicaCont", "probes.readiness.periodSecond", "port-as-string", "empty-ca-secret"],
)
def test_a_misspelled_or_mistyped_value_fails_to_render(values: dict[str, Any]) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema"):
        render(values)


def test_a_grace_budget_that_would_kill_sidekey_mid_drain_fails() -> None:
    with pytest.raises(helm.HelmRenderError, match="terminationGracePeriodSeconds"):
        render({"terminationGracePeriodSeconds": 30})


@pytest.mark.parametrize("values", [{}, {"sidekey": {"nativeSidecar": True}}])
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


def test_hardened_by_default_with_probes_on_the_admin_health_routes() -> None:
    spec = pod_spec_of(manifests(render()))
    for c in spec["initContainers"] + spec["containers"]:
        sc = c["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
    sidekey = next(c for c in spec["containers"] if c["name"] == "sidekey")
    probe_urls = {
        kind: sidekey[kind]["exec"]["command"][-1] for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert '"http://127.0.0.1:9090/readyz"' in probe_urls["startupProbe"]
    assert '"http://127.0.0.1:9090/readyz"' in probe_urls["readinessProbe"]
    assert '"http://127.0.0.1:9090/healthz"' in probe_urls["livenessProbe"]
    assert sidekey["args"][sidekey["args"].index("--admin") + 1] == "127.0.0.1:9090"
    assert spec["automountServiceAccountToken"] is False


def test_the_app_never_mounts_a_key() -> None:
    spec = pod_spec_of(manifests(render()))
    app = next(c for c in spec["containers"] if c["name"] == "app")
    mounted = {m["name"] for m in app["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert mounted == {"sidekey-ca-cert", "sidekey-bundle"}
    assert volumes["sidekey-ca-cert"]["secret"]["items"] == [{"key": "sidekey-ca.pem", "path": "sidekey-ca.pem"}]
    assert "envFrom" not in app


def test_the_example_app_can_be_switched_off() -> None:
    docs = manifests(render({"app": {"enabled": False}}))
    assert [d["kind"] for d in docs] == ["ConfigMap"]
