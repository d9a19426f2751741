"""sidekey inject's decisions over parsed YAML: pure, table-driven."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.inject import (
    InjectError,
    NativeMode,
    conflicts,
    inject_document,
    inject_text,
    inject_workload,
    skip_reason,
    use_native,
)
from proxy.sidecar import APP_ENV, SidecarConfig

SAMPLES = Path(__file__).parents[1] / "k8s" / "samples"
CFG = SidecarConfig(image="registry.example/sidekey:1.2.3")


def deployment(**pod: Any) -> dict[str, Any]:
    spec = {"containers": [{"name": "app", "image": "app:1"}], **pod}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {"selector": {"matchLabels": {"a": "b"}}, "template": {"metadata": {}, "spec": spec}},
    }


def names(items: list[dict[str, Any]] | None) -> list[str]:
    return [i["name"] for i in items or []]


@pytest.mark.parametrize(
    ("mode", "kind", "spec", "native"),
    [
        ("auto", "Deployment", {}, False),
        ("auto", "StatefulSet", {}, False),
        ("auto", "Job", {"restartPolicy": "Never"}, True),
        ("auto", "CronJob", {"restartPolicy": "OnFailure"}, True),
        ("auto", "Pod", {"restartPolicy": "Never"}, True),
        ("auto", "Pod", {"restartPolicy": "Always"}, False),
        ("auto", "Deployment", {"initContainers": [{"name": "x", "restartPolicy": "Always"}]}, True),
        ("true", "Deployment", {}, True),
        ("false", "Deployment", {}, False),
        ("false", "Job", {}, False),
    ],
)
def test_native_sidecar_decision(mode: NativeMode, kind: str, spec: dict[str, Any], native: bool) -> None:
    assert use_native(mode, kind, spec) is native


def test_host_network_pods_are_skipped_and_left_as_written() -> None:
    doc = deployment(hostNetwork=True)
    before = copy.deepcopy(doc)
    assert skip_reason(doc["spec"]["template"]["spec"]) is not None
    outcome = inject_workload(doc, CFG, "auto")
    assert (outcome.action, outcome.workload) == ("skipped", "deployment/web")
    assert "hostNetwork" in outcome.detail
    assert doc == before


SECRET_VALUE = "http://user:hunter2@corp-proxy:3128"


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        (
            {"containers": [{"name": "app", "env": [{"name": "HTTPS_PROXY", "value": SECRET_VALUE}]}]},
            "container app env HTTPS_PROXY",
        ),
        (
            {"containers": [{"name": "app", "env": [{"name": "no_proxy", "value": SECRET_VALUE}]}]},
            "container app env no_proxy",
        ),
        (
            {"containers": [{"name": "app", "env": [{"name": "SSL_CERT_FILE", "value": SECRET_VALUE}]}]},
            "container app env SSL_CERT_FILE",
        ),
        (
            {"containers": [{"name": "app", "ports": [{"containerPort": 8080}]}]},
            "container app port 8080 (sidekey's proxy port)",
        ),
        (
            {"containers": [{"name": "app"}], "initContainers": [{"name": "i", "ports": [{"containerPort": 9090}]}]},
            "container i port 9090 (sidekey's admin port)",
        ),
        ({"containers": [{"name": "app"}], "volumes": [{"name": "sidekey-ca", "emptyDir": {}}]}, "volume sidekey-ca"),
        (
            {"containers": [{"name": "app", "volumeMounts": [{"name": "x", "mountPath": "/etc/sidekey-ca"}]}]},
            "mountPath /etc/sidekey-ca",
        ),
    ],
)
def test_conflicts_are_refused_with_the_field_never_the_value(pod: dict[str, Any], expected: str) -> None:
    assert any(expected in c for c in conflicts(pod, CFG))
    doc = deployment(**pod)
    before = copy.deepcopy(doc)
    with pytest.raises(InjectError) as err:
        inject_workload(doc, CFG, "auto")
    message = str(err.value)
    assert message.startswith("deployment/web: already sets what sidekey inject must own: ")
    assert expected in message and "\n" not in message and SECRET_VALUE not in message
    assert doc == before


def test_other_ports_and_env_do_not_conflict() -> None:
    pod = {
        "containers": [
            {"name": "app", "ports": [{"containerPort": 8000}], "env": [{"name": "HTTPS_PROXY_X", "value": "1"}]}
        ]
    }
    assert conflicts(pod, CFG) == []
    assert conflicts(pod, SidecarConfig(port=8000)) != []


def test_a_regular_sidecar_in_a_job_is_refused() -> None:
    job = {
        "kind": "Job",
        "metadata": {"name": "once"},
        "spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "c"}]}}},
    }
    with pytest.raises(InjectError, match=r"^job/once: its pods run to completion.*--native-sidecar auto or true"):
        inject_workload(job, CFG, "false")


def test_a_workload_without_containers_is_refused() -> None:
    doc = deployment()
    doc["spec"]["template"]["spec"]["containers"] = []
    with pytest.raises(InjectError, match=r"^deployment/web: no pod spec with containers at spec\.template\.spec$"):
        inject_workload(doc, CFG, "auto")


@pytest.mark.parametrize("native", [False, True])
def test_parts_land_where_they_belong(native: bool) -> None:
    doc = deployment(
        initContainers=[{"name": "migrate", "image": "m:1"}],
        volumes=[{"name": "data", "emptyDir": {}}],
    )
    doc["spec"]["template"]["spec"]["containers"].append(
        {"name": "helper", "image": "h:1", "env": [{"name": "A", "value": "1"}]}
    )
    inject_workload(doc, CFG, "true" if native else "false")
    spec = doc["spec"]["template"]["spec"]
    assert names(spec["initContainers"]) == ["sidekey-init", *(["sidekey"] if native else []), "migrate"]
    assert names(spec["containers"]) == [*([] if native else ["sidekey"]), "app", "helper"]
    sidekey = next(c for c in spec["initContainers"] + spec["containers"] if c["name"] == "sidekey")
    assert sidekey.get("restartPolicy") == ("Always" if native else None)
    assert sidekey["image"] == "registry.example/sidekey:1.2.3"
    for app in spec["containers"][0 if native else 1 :]:
        assert names(app["env"])[: len(APP_ENV)] == list(APP_ENV)
        assert names(app["volumeMounts"]) == ["sidekey-ca-cert", "sidekey-bundle"]
    assert names(spec["containers"][-1]["env"])[-1] == "A"
    assert "env" not in spec["initContainers"][-1]  # the app's own init containers are left alone
    assert names(spec["volumes"])[0] == "data"
    # Provider keys and the CA key reach sidekey's containers only.
    for c in spec["containers"] + spec["initContainers"]:
        mounted = set(names(c.get("volumeMounts")))
        if c["name"] not in ("sidekey", "sidekey-init"):
            assert not mounted & {"sidekey-provider-keys", "sidekey-ca-secret", "sidekey-ca"}
    assert doc["spec"]["template"]["metadata"]["annotations"] == {"kubectl.kubernetes.io/default-container": "app"}


def test_injecting_again_changes_nothing_and_updates_what_changed() -> None:
    text = (SAMPLES / "workloads.yaml").read_text()
    once, outcomes = inject_text(text, CFG, "auto")
    twice, again = inject_text(once, CFG, "auto")
    assert twice == once
    assert [o.workload for o in again] == [o.workload for o in outcomes]
    newer, _ = inject_text(once, SidecarConfig(image="registry.example/sidekey:2.0.0"), "auto")
    assert "sidekey:1.2.3" not in newer and newer.count("registry.example/sidekey:2.0.0") == once.count("sidekey:1.2.3")


def test_documents_not_injected_are_left_byte_for_byte() -> None:
    text = (SAMPLES / "workloads.yaml").read_text()
    out, outcomes = inject_text(text, CFG, "auto")
    secret = text[text.index("apiVersion: v1\nkind: Secret") :].split("\n---\n")[0]
    assert secret in out  # the comment and the layout too
    daemon = text[text.index("apiVersion: apps/v1\nkind: DaemonSet\nmetadata:\n  name: node-agent") :].split("\n---\n")[
        0
    ]
    assert daemon in out
    kinds = [d.get("kind") for d in yaml.safe_load_all(out)]
    assert kinds == [d.get("kind") for d in yaml.safe_load_all(text) if d]
    assert {o.workload: o.action for o in outcomes} == {
        "deployment/web": "injected", "statefulset/store": "injected", "daemonset/node-agent": "skipped",
        "daemonset/log-shipper": "injected", "job/nightly-summary": "injected", "cronjob/hourly-report": "injected",
        "pod/migrate": "injected",
    }  # fmt: skip


def test_a_list_has_its_workloads_injected() -> None:
    doc = yaml.safe_load((SAMPLES / "list.yaml").read_text())
    outcomes = inject_document(doc, CFG, "auto")
    assert [(o.workload, o.action) for o in outcomes] == [("deployment/listed-web", "injected")]
    assert names(doc["items"][0]["spec"]["template"]["spec"]["containers"]) == ["sidekey", "web"]
    assert doc["items"][1] == {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "listed-config"},
        "data": {"key": "value"},
    }


def test_documents_share_no_objects() -> None:
    text = "\n---\n".join(yaml.safe_dump(deployment()) for _ in range(2))
    out, _ = inject_text(text, CFG, "auto")
    assert "&id" not in out and "*id" not in out
