"""The sidecar spec against the real binary: run sidekey-init and sidekey with
exactly the command, args and env that proxy/sidecar.py gives the pod (the
chart transcribes the same spec, tests/k8s/test_sidecar_parity.py), only the
pod's mount paths moved under a temporary directory. Then do what kubelet and
Prometheus do: the httpGet probes and a scrape on the named `metrics` port,
without a token; and what an app container could do: call the admin API on
loopback without the token, which must be refused."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from proxy import sidecar
from proxy.sidecar import SidecarConfig, sidecar_parts
from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import SECRET_ENV, policy_for
from tests.integration.sidekey_process import REPO

TOKEN = "adm-contract-tok-3"
SIDEKEY = str(Path(sys.executable).parent / "sidekey")  # the console script the image's ENTRYPOINT runs


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def relocate(args: list[str], mounts: dict[str, Path]) -> list[str]:
    """The pod's mount paths, moved under tmp_path (longest prefix first)."""
    out = []
    for arg in args:
        for pod_path in sorted(mounts, key=len, reverse=True):
            if arg == pod_path or arg.startswith(pod_path + "/"):
                arg = str(mounts[pod_path]) + arg[len(pod_path) :]
                break
        out.append(arg)
    return out


def env_of(container: dict[str, Any], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The container's env as kubelet resolves it (secretKeyRef from `secrets`)."""
    env = {}
    for entry in container.get("env", []):
        if "value" in entry:
            env[entry["name"]] = entry["value"]
        else:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[(ref["name"], ref["key"])]
    return env


@pytest.fixture
def pod(tmp_path: Path, fake: FakeProviderThread) -> Iterator[dict[str, Any]]:
    proxy_port, admin_port, metrics_port = free_ports(3)
    cfg = SidecarConfig(port=proxy_port, admin_port=admin_port, metrics_port=metrics_port, provider_secrets_as_env=True)
    parts = sidecar_parts(cfg)
    init, container = parts.init_containers[0], parts.containers[0]
    assert (init["name"], container["name"]) == (sidecar.INIT, sidecar.SIDECAR)

    # The CA Secret as kubelet mounts it (defaultMode 0444), made by `sidekey ca`.
    secret_dir = tmp_path / "ca-secret"
    subprocess.run([SIDEKEY, "ca", "--certs", str(secret_dir)], capture_output=True, check=True, timeout=120)
    for f in secret_dir.iterdir():
        f.chmod(0o444)
    policy_dir = tmp_path / "policy"
    policy_dir.mkdir()
    (policy_dir / "policies.yaml").write_text(policy_for(fake))
    mounts = {
        sidecar.CA_SECRET_DIR: secret_dir,
        sidecar.CA_DIR: tmp_path / "ca",
        "/bundle": tmp_path / "bundle",
        "/etc/sidekey": policy_dir,
    }
    (tmp_path / "bundle").mkdir()
    base_env = {k: v for k, v in os.environ.items() if k not in ("SIDEKEY_ADMIN_TOKEN", "HTTPS_PROXY", "https_proxy")}
    base_env["PATH"] = f"{Path(SIDEKEY).parent}{os.pathsep}{base_env.get('PATH', '')}"  # as the image's ENV PATH
    pod_env = {"KUBERNETES_SERVICE_HOST": "10.96.0.1"}  # kubelet sets it in every pod: pod mode
    secrets = {(cfg.admin_token_secret, cfg.admin_token_key): TOKEN}

    done = subprocess.run(
        [*init["command"], *relocate(init["args"], mounts)],
        env=base_env | pod_env | env_of(init, secrets), cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "ca" / "sidekey-ca.pem").read_bytes() == (secret_dir / "sidekey-ca.pem").read_bytes()

    env = base_env | pod_env | SECRET_ENV | env_of(container, secrets)
    log_path = tmp_path / "sidekey.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*container["command"], *relocate(container["args"], mounts)],
            env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        yield {"container": container, "proc": proc, "log": log_path, "admin_port": admin_port, "tmp": tmp_path}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def http_get(port: int, path: str, token: str | None = None) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10, trust_env=False)


def named_port(container: dict[str, Any], name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return int(port)


def test_the_probes_and_the_scrape_work_without_a_token_and_the_admin_api_wants_it(pod: dict[str, Any]) -> None:
    container, proc = pod["container"], pod["proc"]
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    ports = {probe["port"] for probe in probes.values()}
    assert ports == {"metrics"}
    port = named_port(container, "metrics")

    # kubelet's startup probe: poll until 200 (generous deadline: a loaded machine).
    deadline = time.monotonic() + 60
    status = 0
    while time.monotonic() < deadline and status != 200:
        assert proc.poll() is None, pod["log"].read_text()
        try:
            status = http_get(port, probes["startupProbe"]["path"]).status_code
        except httpx.TransportError:
            time.sleep(0.1)
    assert status == 200, pod["log"].read_text()
    assert http_get(port, probes["readinessProbe"]["path"]).status_code == 200
    assert http_get(port, probes["livenessProbe"]["path"]).json() == {"status": "ok"}
    scrape = http_get(port, "/metrics")
    assert scrape.status_code == 200 and "sidekey_" in scrape.text

    # The app shares the loopback: without the token the admin API refuses.
    admin = pod["admin_port"]
    for path in ("/providers", "/policy", "/metrics"):
        assert http_get(admin, path).status_code == 401, path
    assert http_get(admin, "/providers", TOKEN).status_code == 200
    assert TOKEN not in pod["log"].read_text()


def test_sidekey_serves_leaf_certs_from_the_secrets_ca(pod: dict[str, Any], fake: FakeProviderThread) -> None:
    """The CA sidekey signs with is the one from the Secret (copied by the init step), not a new one."""
    port = named_port(pod["container"], "metrics")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if http_get(port, "/readyz").status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.1)
    args = pod["container"]["args"]
    proxy = "http://" + args[args.index("--listen") + 1]
    ca = pod["tmp"] / "ca-secret" / "sidekey-ca.pem"
    done = subprocess.run(
        ["curl", "-sS", "--noproxy", "", "-x", proxy, "--cacert", str(ca), "-o", "/dev/null", "-w", "%{http_code}",
         "https://api.openai.com/v1/models"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stdout == "200"
