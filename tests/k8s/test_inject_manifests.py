"""The real `sidekey inject` CLI on sample workloads of every kind it
handles (one with its own init container, one on hostNetwork, a multi-document
file, a List): valid manifests (kubernetes-validate --strict, two newest
minors), a second injection is a no-op, a conflict exits non-zero with one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.k8s.kube import newest_minors, validate_strict

SAMPLES = Path(__file__).parent / "samples"


def inject(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", "inject", *args], input=stdin, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("sample", ["workloads.yaml", "list.yaml"])
@pytest.mark.parametrize("native", ["auto", "true"])
def test_injected_samples_are_valid_and_a_second_injection_changes_nothing(sample: str, native: str) -> None:
    first = inject("-f", str(SAMPLES / sample), "--native-sidecar", native)
    assert first.returncode == 0, first.stderr
    docs = list(yaml.safe_load_all(first.stdout))
    checked = validate_strict(docs)
    items = [i for d in docs for i in (d["items"] if d["kind"] == "List" else [d])]
    assert len(checked) == len(items) * len(newest_minors())
    second = inject("-f", "-", "--native-sidecar", native, stdin=first.stdout)
    assert second.returncode == 0, second.stderr
    assert second.stdout == first.stdout


def test_every_kind_is_reported_and_host_network_is_skipped() -> None:
    done = inject("-f", str(SAMPLES / "workloads.yaml"))
    assert done.returncode == 0
    assert done.stderr.splitlines() == [
        "deployment/web injected (sidecar container)",
        "statefulset/store injected (sidecar container)",
        "daemonset/node-agent skipped (hostNetwork: sidekey's loopback listener would be the node's, open to every host-network process)",
        "daemonset/log-shipper injected (sidecar container)",
        "job/nightly-summary injected (native sidecar)",
        "cronjob/hourly-report injected (native sidecar)",
        "pod/migrate injected (sidecar container)",
    ]
    docs = {f"{d['kind']}/{d['metadata']['name']}": d for d in yaml.safe_load_all(done.stdout)}
    migrate = docs["Pod/migrate"]["spec"]
    assert [c["name"] for c in migrate["initContainers"]] == ["sidekey-init", "wait-for-db"]
    store = docs["StatefulSet/store"]["spec"]["template"]["spec"]["containers"][1]
    assert [m["name"] for m in store["volumeMounts"]] == ["data", "sidekey-ca-cert", "sidekey-bundle"]


@pytest.mark.parametrize("native", ["auto", "true"])
def test_the_admin_token_reaches_sidekey_only_and_inject_writes_no_secret(native: str) -> None:
    done = inject(
        "-f", str(SAMPLES / "workloads.yaml"), "--native-sidecar", native, "--admin-token-secret", "ops-admin"
    )
    assert done.returncode == 0, done.stderr
    docs = list(yaml.safe_load_all(done.stdout))
    source = list(yaml.safe_load_all((SAMPLES / "workloads.yaml").read_text()))
    assert [d for d in docs if d["kind"] == "Secret"] == [d for d in source if d["kind"] == "Secret"]
    ref = {"name": "SIDEKEY_ADMIN_TOKEN", "valueFrom": {"secretKeyRef": {"name": "ops-admin", "key": "token"}}}
    injected = 0
    for doc in docs:
        if doc["kind"] in ("Secret", "ConfigMap", "Service"):
            continue
        spec = doc["spec"]
        spec = spec.get("jobTemplate", {}).get("spec", spec)
        spec = spec["template"]["spec"] if "template" in spec else spec
        for c in spec.get("initContainers", []) + spec["containers"]:
            tokens = [e for e in c.get("env", []) if e["name"] == "SIDEKEY_ADMIN_TOKEN"]
            assert tokens == ([ref] if c["name"] == "sidekey" else []), f"{doc['metadata']['name']}/{c['name']}"
            assert "ops-admin" not in str(c.get("envFrom", [])) + str(c.get("volumeMounts", []))
            injected += c["name"] == "sidekey"
    assert injected == 6  # every workload but the hostNetwork DaemonSet


def test_secrets_pass_through_as_written() -> None:
    text = (SAMPLES / "workloads.yaml").read_text()
    done = inject("-f", str(SAMPLES / "workloads.yaml"))
    secret = text[text.index("apiVersion: v1\nkind: Secret") :].split("\n---\n")[0]
    assert secret in done.stdout
    assert done.stdout.count("sk-real-key-that-must-stay-as-written") == 1


def test_conflicting_env_is_refused_in_one_line_with_nothing_written(tmp_path: Path) -> None:
    workload = yaml.safe_load((SAMPLES / "workloads.yaml").read_text().split("\n---\n")[0].split("\n", 2)[2])
    workload["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "HTTPS_PROXY", "value": "http://corp:s3cret@proxy.corp:3128"}
    )
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(workload))
    done = inject("-f", str(path))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == (
        f"sidekey inject: {path}: deployment/web: already sets what sidekey inject must own: "
        "container web env HTTPS_PROXY (sidekey sets it)\n"
    )


def test_unreadable_and_invalid_input_exit_non_zero(tmp_path: Path) -> None:
    missing = inject("-f", str(tmp_path / "nope.yaml"))
    assert (missing.returncode, missing.stdout) == (2, "")
    assert missing.stderr == f"sidekey inject: {tmp_path / 'nope.yaml'}: cannot read (No such file or directory)\n"
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: Deployment\nspec: [unclosed\n")
    broken = inject("-f", str(bad))
    assert (
        broken.returncode == 2
        and broken.stderr.startswith(f"sidekey inject: {bad}:")
        and "not valid YAML" in broken.stderr
    )
