"""One sidecar: the chart's sidekey.sidecar template (rendered by Helm) and
`sidekey inject` (proxy/sidecar.py) give the same sidekey containers, init
step, volumes, app env and app mounts, over every option both offer."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.inject import inject_text
from proxy.sidecar import APP_ENV, SidecarConfig
from tests.k8s.kube import CHART, RELEASE, manifests, pod_spec_of, render, validate_strict

IMAGE = "ghcr.io/example/sidekey:0.1.0"  # the chart's default: repository + appVersion
POLICY_CM = f"{RELEASE}-sidekey-policy"
ADMIN_SECRET = f"{RELEASE}-sidekey-admin"  # the chart's generated admin token Secret
WORKLOAD = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
    spec:
      containers:
        - name: app
          image: python:3.12-slim
"""


def sidecar_of(spec: dict[str, Any]) -> dict[str, Any]:
    """The sidecar's parts of an injected pod spec (the app is container 'app')."""
    app = next(c for c in spec["containers"] if c["name"] == "app")
    return {
        "initContainers": spec.get("initContainers", []),
        "containers": [c for c in spec["containers"] if c["name"] != "app"],
        "volumes": spec["volumes"],
        "appEnv": [e for e in app["env"] if e["name"] in APP_ENV],
        "appVolumeMounts": app["volumeMounts"],
    }


def chart_values(native: bool, bundle: bool, providers: str, as_env: bool, port: int) -> dict[str, Any]:
    return {
        "sidekey": {
            "nativeSidecar": native,
            "port": port,
            "metricsPort": port + 1011,
            "noProxy": ["api.internal.example"],
        },  # fmt: skip
        "ca": {"existingSecret": "team-ca", "bundle": bundle},
        "providerSecrets": {"existingSecret": providers, "asEnv": as_env},
    }


def cli_config(native: bool, bundle: bool, providers: str, as_env: bool, port: int) -> SidecarConfig:
    return SidecarConfig(
        image=IMAGE, native=native, port=port, metrics_port=port + 1011, admin_token_secret=ADMIN_SECRET,
        no_proxy=("api.internal.example",), policy_configmap=POLICY_CM,
        ca_secret="team-ca", ca_bundle=bundle, provider_secret=providers, provider_secrets_as_env=as_env,
    )  # fmt: skip


OPTIONS = [
    (native, bundle, providers, as_env, port)
    for native, bundle, (providers, as_env), port in itertools.product(
        (False, True), (True, False), (("keys", False), ("keys", True), ("", False)), (8080, 18080)
    )
]


@pytest.mark.parametrize(("native", "bundle", "providers", "as_env", "port"), OPTIONS)
def test_chart_and_inject_give_the_same_sidecar(
    native: bool, bundle: bool, providers: str, as_env: bool, port: int
) -> None:
    chart = sidecar_of(pod_spec_of(manifests(render(chart_values(native, bundle, providers, as_env, port)))))
    out, _ = inject_text(WORKLOAD, cli_config(native, bundle, providers, as_env, port), "true" if native else "false")
    injected = sidecar_of(pod_spec_of(list(yaml.safe_load_all(out))))
    assert injected == chart
    # the parts this compares include the new ones (not vacuously equal)
    sidekey = next(c for c in chart["initContainers"] + chart["containers"] if c["name"] == "sidekey")
    assert sidekey["ports"] == [{"name": "metrics", "containerPort": port + 1011, "protocol": "TCP"}]
    assert sidekey["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
    assert {"name": "SIDEKEY_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": ADMIN_SECRET, "key": "token"}}} in (
        sidekey["env"]
    )


def test_an_existing_admin_token_secret_and_its_cli_flag_agree() -> None:
    chart = sidecar_of(pod_spec_of(manifests(render({"adminToken": {"existingSecret": "ops-admin"}}))))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "inject", "-f", "-", "--image", IMAGE, "--policy-configmap", POLICY_CM,
         "--native-sidecar", "false", "--admin-token-secret", "ops-admin"],
        input=WORKLOAD, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert sidecar_of(pod_spec_of(list(yaml.safe_load_all(done.stdout)))) == chart


@pytest.mark.parametrize("native", ["false", "true"])
def test_the_cli_with_its_defaults_matches_the_chart_with_its_defaults(native: str) -> None:
    # Only the admin token Secret's name differs by design: the chart generates
    # <fullname>-admin, inject names the one the user creates.
    values = {"sidekey": {"nativeSidecar": native == "true"}, "adminToken": {"existingSecret": "sidekey-admin-token"}}
    chart = sidecar_of(pod_spec_of(manifests(render(values))))
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "inject", "-f", "-", "--image", IMAGE, "--policy-configmap", POLICY_CM,
         "--native-sidecar", native],
        input=WORKLOAD, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    assert sidecar_of(pod_spec_of(list(yaml.safe_load_all(done.stdout)))) == chart


PARENT_TEMPLATE = """\
{{- $sk := include "sidekey.sidecar" (dict "Values" .Values.sidekey) | fromYaml }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: app
spec:
  selector:
    matchLabels: {app: app}
  template:
    metadata:
      labels: {app: app}
    spec:
      initContainers: {{- toYaml $sk.initContainers | nindent 8 }}
      containers:
        {{- with $sk.containers }}{{ toYaml . | nindent 8 }}{{ end }}
        - name: app
          image: python:3.12-slim
          env: {{- toYaml $sk.appEnv | nindent 12 }}
          volumeMounts: {{- toYaml $sk.appVolumeMounts | nindent 12 }}
      volumes: {{- toYaml $sk.volumes | nindent 8 }}
"""


def test_another_chart_includes_the_named_template(tmp_path: Path) -> None:
    parent = tmp_path / "parent"
    (parent / "templates").mkdir(parents=True)
    (parent / "Chart.yaml").write_text(
        "apiVersion: v2\nname: parent\nversion: 1.0.0\n"
        "dependencies:\n  - name: sidekey\n    version: 0.1.0\n    repository: file://../sidekey\n"
    )
    (parent / "values.yaml").write_text(
        "sidekey:\n  app: {enabled: false}\n  adminToken: {existingSecret: demo-sidekey-admin}\n"
        "  sidekey:\n    image: {tag: '0.1.0'}\n    policyConfigMap: demo-sidekey-policy\n"
    )
    (parent / "templates" / "deployment.yaml").write_text(PARENT_TEMPLATE)
    shutil.copytree(CHART, parent / "charts" / "sidekey")
    docs = manifests(render(chart=parent))
    validate_strict(docs)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "Deployment"]  # the subchart's policy, no example app
    assert sidecar_of(pod_spec_of(docs)) == sidecar_of(pod_spec_of(manifests(render())))
