"""The repository's Dockerfile, built and run: a request through the running
container reaches a fake provider on loopback with the real key, while the
client held only a placeholder.

The base image is made locally (tests/container/base_image.py: no registry is
reachable here). buildah builds the real Dockerfile on it; podman runs the
image as the issue asks a sidecar to run: read-only root filesystem, one
writable mount at /run/sidekey, uid 10001, the key in the environment.

Two adjustments for sandboxed machines, neither in the Dockerfile:
* Debian 12's crun refuses hybrid cgroup hierarchies ("cgroups in hybrid mode
  not supported"), so runc (also Debian's) is used when installed.
* Without CAP_SYS_RESOURCE, podman's default rlimits (nofile 1048576, nproc
  4194304 for root) cannot be set; the container gets this process's own
  nofile limit and a modest nproc (sidekey is one process).
The build stage's pip reaches PyPI over the host network, trusting the host's
CA bundle (mounted for RUN steps only, never committed to a layer).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import ssl
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy import __version__
from tests.container.base_image import ensure_base_image
from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import OPENAI_KEY, PLACEHOLDER, SECRETS

pytestmark = [pytest.mark.container, pytest.mark.timeout(1200)]

REPO = Path(__file__).resolve().parents[2]
TOOLS = ("buildah", "podman", "debootstrap")
MISSING = [tool for tool in TOOLS if shutil.which(tool) is None]
if MISSING:
    pytest.skip(
        f"container tools absent: {', '.join(MISSING)} (.ci/container-tools installs them)", allow_module_level=True
    )

RUNTIME = ["--runtime", "runc"] if shutil.which("runc") else []
PODMAN = ["podman", *RUNTIME]
HOST_CA = Path(os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt")
SOURCE = "https://example.invalid/sidekey.git"
UID = 10001
_LISTENING = re.compile(r"sidekey listening on 127\.0\.0\.1:(\d+)")
_ADMIN = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")


def run(cmd: list[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure the error carries its output."""
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{cmd[0]} {cmd[1]} exited {done.returncode}:\n{done.stdout}\n{done.stderr}")
    return done


def build(tag: str, version: str, log: Path) -> subprocess.CompletedProcess[str]:
    """buildah builds the repository's Dockerfile on the local base image."""
    pip_conf = log.parent / "pip.conf"
    pip_conf.write_text("[global]\ncert = /run/host-ca.crt\n")
    cmd = [
        "buildah", *RUNTIME, "bud", "--network", "host", "--layers",
        "--volume", f"{HOST_CA}:/run/host-ca.crt:ro", "--volume", f"{pip_conf}:/etc/pip.conf:ro",
        "--build-arg", f"BASE_IMAGE={ensure_base_image(PODMAN)}", "--build-arg", f"VERSION={version}",
        "--build-arg", f"SOURCE={SOURCE}", "-f", str(REPO / "Dockerfile"), "-t", tag, str(REPO),
    ]  # fmt: skip
    with open(log, "w") as out:
        return subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, text=True, timeout=900, check=False)


def remove_image(tag: str) -> None:
    subprocess.run([*PODMAN, "rmi", "--force", tag], capture_output=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The image built from the repository's Dockerfile."""
    tag = f"localhost/sidekey-test:{uuid.uuid4().hex[:12]}"
    log = tmp_path_factory.mktemp("build") / "build.log"
    started = time.monotonic()
    done = build(tag, __version__, log)
    if done.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-40:])
        raise AssertionError(f"buildah bud exited {done.returncode}; log {log}:\n{tail}")
    print(f"image {tag} built in {time.monotonic() - started:.0f}s (base image included)")
    yield tag
    remove_image(tag)


def test_image_metadata(image: str) -> None:
    done = run([*PODMAN, "image", "inspect", image], timeout=60)
    config = json.loads(done.stdout)[0]["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["sidekey"]
    assert config["Cmd"] == ["run"]
    assert set(config["ExposedPorts"]) == {"8080/tcp", "9090/tcp", "9091/tcp"}
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == __version__
    assert labels["org.opencontainers.image.source"] == SOURCE
    env = dict(item.split("=", 1) for item in config["Env"])
    # A sidecar shares loopback with its app: the defaults never listen on the pod network.
    assert env["SIDEKEY_LISTEN"] == "127.0.0.1:8080"
    assert env["SIDEKEY_ADMIN"] == "127.0.0.1:9090"
    assert env["SIDEKEY_CERTS"].startswith("/run/sidekey/")


def test_version_label_must_match_the_package(image: str, tmp_path: Path) -> None:
    """A stale VERSION build-arg fails the build instead of mislabelling the
    image; it fails at the check, after sidekey's wheel installed."""
    tag = f"localhost/sidekey-test:stale-{uuid.uuid4().hex[:8]}"
    log = tmp_path / "build.log"
    done = build(tag, "0.0.0-stale", log)
    remove_image(tag)
    text = log.read_text(errors="replace")
    assert done.returncode != 0, "a build labelled with the wrong version succeeded"
    assert f"Successfully installed sidekey-{__version__}" in text
    assert "Successfully tagged" not in text


class Container:
    def __init__(self, name: str) -> None:
        self.name = name

    def logs(self) -> str:
        done = subprocess.run([*PODMAN, "logs", self.name], capture_output=True, text=True, timeout=60, check=False)
        return done.stdout + done.stderr

    def inspect(self) -> dict[str, object]:
        data: list[dict[str, object]] = json.loads(run([*PODMAN, "inspect", self.name], timeout=60).stdout)
        return data[0]

    def ports(self, deadline: float = 90.0) -> tuple[int, int]:
        """The proxy's and the admin's ports, once both listen (read from the log)."""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            log = self.logs()
            proxy, admin = _LISTENING.search(log), _ADMIN.search(log)
            if proxy and admin:
                return int(proxy.group(1)), int(admin.group(1))
            state = self.inspect()["State"]
            assert isinstance(state, dict)
            if not state.get("Running"):
                raise AssertionError(f"the container exited {state.get('ExitCode')}:\n{log}")
            time.sleep(0.2)
        raise AssertionError(f"sidekey in the container did not listen within {deadline}s:\n{self.logs()}")


def wait_for_text(path: Path, needle: str, deadline: float = 30.0) -> str:
    """The file's text once it holds ``needle`` (the audit log is flushed by a
    timer every 0.25 s; the deadline is generous for a loaded machine)."""
    end = time.monotonic() + deadline
    text = ""
    while time.monotonic() < end:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.1)
    raise AssertionError(f"{path} did not get {needle!r} within {deadline}s: {text!r}")


@pytest.fixture
def fake() -> Iterator[FakeProviderThread]:
    with FakeProviderThread() as provider:
        yield provider


@pytest.fixture
def container(image: str, fake: FakeProviderThread, tmp_path: Path) -> Iterator[tuple[Container, Path]]:
    """sidekey's image running as a sidecar would: read-only root, one writable
    directory (standing in for a tmpfs/emptyDir, here a host directory so the
    test can read the CA sidekey creates), the real key in its environment."""
    state = tmp_path / "state"
    state.mkdir()
    os.chown(state, UID, UID)
    config = tmp_path / "config"
    config.mkdir()
    upstream = f"https://127.0.0.1:{fake.port}"
    (config / "policies.yaml").write_text(
        "version: 1\nunmatched: deny\nproviders:\n"
        "  openai:\n    hosts: [api.openai.com]\n"
        f"    upstream: {upstream}\n"
        "    auth: {type: bearer, secret: env:OPENAI_API_KEY}\n"
        "    tls: {ca_bundle: /etc/sidekey/fake-provider-ca.pem}\n"
        "    retry: {attempts: 1}\n"
    )
    shutil.copy(fake.ca_pem_path, config / "fake-provider-ca.pem")
    for path in config.iterdir():
        path.chmod(0o644)  # root-owned, world-readable: the mounted ConfigMap's role
    config.chmod(0o755)
    name = f"sidekey-test-{uuid.uuid4().hex[:12]}"
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    cmd = [
        *PODMAN, "run", "--detach", "--name", name, "--network", "host",
        "--read-only", "--read-only-tmpfs=false",  # no writable /tmp, /run: only the mount below
        "--ulimit", f"nofile={nofile}:{nofile}", "--ulimit", "nproc=4096:4096",
        "--volume", f"{state}:/run/sidekey", "--volume", f"{config}:/etc/sidekey:ro",
        # Port 0: other tests share this host's loopback; the ports are read from the log.
        "--env", "SIDEKEY_LISTEN=127.0.0.1:0", "--env", "SIDEKEY_ADMIN=127.0.0.1:0",
        "--env", "SIDEKEY_AUDIT=/run/sidekey/audit.jsonl", "--env", "SIDEKEY_DLQ=/run/sidekey/dlq.jsonl",
        "--env", "SIDEKEY_LOG_LEVEL=DEBUG",
        "--env", "OPENAI_API_KEY",  # the value comes from podman's environment, not its argv
        image,
    ]  # fmt: skip
    env = {**os.environ, "OPENAI_API_KEY": OPENAI_KEY}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
    if done.returncode != 0:
        raise AssertionError(f"podman run exited {done.returncode}:\n{done.stderr}")
    try:
        yield Container(name), state
    finally:
        subprocess.run([*PODMAN, "rm", "--force", "--time", "10", name], capture_output=True, timeout=120, check=False)


def test_request_through_the_running_image_gets_the_real_key(
    container: tuple[Container, Path], fake: FakeProviderThread
) -> None:
    ctr, state = container
    port, admin_port = ctr.ports()
    ca = state / "certs" / "sidekey-ca.pem"
    assert ca.is_file(), "sidekey made no CA under the writable mount"
    client_ssl = ssl.create_default_context(cafile=str(ca))
    with httpx.Client(proxy=f"http://127.0.0.1:{port}", verify=client_ssl, trust_env=False, timeout=30) as client:
        resp = client.post(
            "https://api.openai.com/v1/chat/completions",
            headers={"Authorization": f"Bearer {PLACEHOLDER}"},
            json={"model": "gpt-fake", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert resp.status_code == 200, resp.text
    assert resp.json()["choices"][0]["message"]["content"] == fake.provider.openai_reply
    assert fake.last().header("authorization") == f"Bearer {OPENAI_KEY}"
    assert PLACEHOLDER not in json.dumps(fake.last().headers)

    admin = httpx.get(f"http://127.0.0.1:{admin_port}/healthz", timeout=10)
    assert admin.status_code == 200

    # The audit log went to the one writable mount, and no secret anywhere.
    audit = wait_for_text(state / "audit.jsonl", "api.openai.com")
    for text in (audit, ctr.logs()):
        for secret in SECRETS:
            assert secret not in text, "a secret leaked"


def test_runs_as_uid_10001_on_a_read_only_root(container: tuple[Container, Path]) -> None:
    ctr, state = container
    ctr.ports()
    info = ctr.inspect()
    host_config, st = info["HostConfig"], info["State"]
    assert isinstance(host_config, dict) and isinstance(st, dict)
    assert host_config["ReadonlyRootfs"] is True
    # The process itself, seen from the host (no user namespace): uid 10001, no capabilities.
    status = Path(f"/proc/{st['Pid']}/status").read_text()
    uids = re.search(r"^Uid:\s+(.*)$", status, flags=re.MULTILINE)
    assert uids is not None and uids.group(1).split() == [str(UID)] * 4
    assert re.search(r"^CapEff:\s+0+$", status, flags=re.MULTILINE)
    for path in (state / "certs" / "sidekey-ca.pem", state / "certs" / "sidekey-ca-key.pem"):
        assert path.stat().st_uid == UID
    # Inside: the root filesystem refuses writes (EROFS), /run/sidekey takes them.
    probe = (
        "import errno, os, tempfile\n"
        "try:\n    open('/opt/sidekey/probe', 'w')\nexcept OSError as e:\n    print(errno.errorcode[e.errno])\n"
        "print(tempfile.gettempdir())\n"
    )
    done = run([*PODMAN, "exec", ctr.name, "/opt/sidekey/bin/python", "-c", probe], timeout=60)
    assert done.stdout.split() == ["EROFS", "/run/sidekey"]
