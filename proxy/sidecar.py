"""The sidekey sidecar as Kubernetes pod-spec parts: the one spec that
``sidekey inject`` applies and that the Helm chart's ``sidekey.sidecar``
template transcribes.

Why two transcriptions and not one file both read: the chart must render with
a plain ``helm`` (no Python), and the CLI must run without Helm (the only
Helm that installs from PyPI is a 75 MB native library). So this module is
the reference and ``helm/sidekey/templates/_sidecar.tpl`` mirrors it; a test
renders the chart and the CLI over the same options and requires the parts to
be equal (tests/k8s/test_sidecar_parity.py). Change both together.

Pure data in, plain dicts out (the shape of the Kubernetes API objects), no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from proxy import __version__

# Names and paths, in one place (the chart's _sidecar.tpl repeats them).
SIDECAR = "sidekey"
INIT = "sidekey-init"
CA_DIR = "/etc/sidekey/ca"  # sidekey's private copy of the CA (cert + key)
CA_SECRET_DIR = "/var/run/sidekey/ca-secret"  # the CA Secret, in sidekey-init only
PROVIDER_DIR = "/var/run/secrets/sidekey"  # provider keys as files, sidekey only
ADMIN_TOKEN_ENV = "SIDEKEY_ADMIN_TOKEN"  # from a Secret key, sidekey's container only
METRICS_PORT_NAME = "metrics"
APP_CA_DIR = "/etc/sidekey-ca"  # the CA certificate, never the key
APP_BUNDLE_DIR = "/etc/sidekey-bundle"  # system CAs + sidekey's CA
VOL_POLICY = "sidekey-policy"
VOL_CA_SECRET = "sidekey-ca-secret"
VOL_CA = "sidekey-ca"
VOL_CA_CERT = "sidekey-ca-cert"
VOL_BUNDLE = "sidekey-bundle"
VOL_PROVIDERS = "sidekey-provider-keys"
VOL_TMP = "sidekey-tmp"
VOLUMES = (VOL_POLICY, VOL_CA_SECRET, VOL_CA, VOL_CA_CERT, VOL_BUNDLE, VOL_PROVIDERS, VOL_TMP)

# Hosts the app reaches without the proxy: loopback (sidekey's own admin port
# among them) and in-cluster names. Lower and upper case: curl reads only the
# lower-case http_proxy, and Python prefers the lower-case names when both exist.
CLUSTER_NO_PROXY = (
    "localhost", "127.0.0.1", "::1", ".svc", ".svc.cluster.local", ".cluster.local", "$(KUBERNETES_SERVICE_HOST)",
)  # fmt: skip
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy")
TRUST_ENV = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")
APP_ENV = PROXY_ENV + TRUST_ENV


def _default_resources() -> dict[str, Any]:
    return {"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"cpu": "1", "memory": "256Mi"}}


def _default_init_resources() -> dict[str, Any]:
    return {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"cpu": "500m", "memory": "128Mi"}}


def _default_security_context() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": 10001,
        "runAsGroup": 10001,
        "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
    }


def _default_probes() -> dict[str, Any]:
    return {
        "startup": {"periodSeconds": 1, "timeoutSeconds": 3, "failureThreshold": 60},
        "readiness": {"periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
        "liveness": {"periodSeconds": 20, "timeoutSeconds": 3, "failureThreshold": 3},
    }


@dataclass(frozen=True, slots=True)
class SidecarConfig:
    """What the sidecar is made of; the chart's ``sidekey``, ``ca`` and
    ``providerSecrets`` values, with the chart's defaults."""

    image: str = f"sidekey:{__version__}"
    pull_policy: str = "IfNotPresent"
    native: bool = False
    port: int = 8080
    admin_port: int = 9090
    metrics_port: int = 9091  # --metrics-listen on the pod IP: /metrics, /healthz, /readyz, no token
    grace: str = "30"
    log_level: str = "INFO"
    wait_for_proxy_seconds: int = 30
    pre_stop_sleep_seconds: int = 0
    extra_args: tuple[str, ...] = ()
    no_proxy: tuple[str, ...] = ()
    policy_configmap: str = "sidekey-policy"
    ca_secret: str = "sidekey-ca"
    ca_bundle: bool = True
    provider_secret: str = "sidekey-provider-keys"  # "": none mounted
    provider_secrets_as_env: bool = False
    admin_token_secret: str = "sidekey-admin-token"  # its key `admin_token_key` is SIDEKEY_ADMIN_TOKEN
    admin_token_key: str = "token"
    resources: dict[str, Any] = field(default_factory=_default_resources)
    init_resources: dict[str, Any] = field(default_factory=_default_init_resources)
    security_context: dict[str, Any] = field(default_factory=_default_security_context)
    probes: dict[str, Any] = field(default_factory=_default_probes)


@dataclass(frozen=True, slots=True)
class SidecarParts:
    """What injection adds to a pod spec. ``init_containers`` go first in
    ``initContainers``; ``containers`` (the regular-mode sidecar) first in
    ``containers``; ``app_env`` first in each app container's env."""

    init_containers: list[dict[str, Any]]
    containers: list[dict[str, Any]]
    volumes: list[dict[str, Any]]
    app_env: list[dict[str, Any]]
    app_volume_mounts: list[dict[str, Any]]


def sidecar_parts(cfg: SidecarConfig) -> SidecarParts:
    sidecar = _sidecar_container(cfg)
    return SidecarParts(
        init_containers=[_init_container(cfg), *([sidecar] if cfg.native else [])],
        containers=[] if cfg.native else [sidecar],
        volumes=_volumes(cfg),
        app_env=_app_env(cfg),
        app_volume_mounts=_app_mounts(cfg),
    )


def _trust_file(cfg: SidecarConfig) -> str:
    return f"{APP_BUNDLE_DIR}/ca-bundle.pem" if cfg.ca_bundle else f"{APP_CA_DIR}/sidekey-ca.pem"


def _app_env(cfg: SidecarConfig) -> list[dict[str, Any]]:
    proxy = f"http://127.0.0.1:{cfg.port}"
    no_proxy = ",".join((*CLUSTER_NO_PROXY, *cfg.no_proxy))
    trust = _trust_file(cfg)
    values = {
        "HTTPS_PROXY": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "http_proxy": proxy,
        "NO_PROXY": no_proxy, "no_proxy": no_proxy,
        "SSL_CERT_FILE": trust, "REQUESTS_CA_BUNDLE": trust,
        "CURL_CA_BUNDLE": trust,  # curl ignores SSL_CERT_FILE
        "NODE_EXTRA_CA_CERTS": f"{APP_CA_DIR}/sidekey-ca.pem",  # added to Node's own store: the bare CA is enough
    }  # fmt: skip
    return [{"name": name, "value": values[name]} for name in APP_ENV]


def _app_mounts(cfg: SidecarConfig) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [{"name": VOL_CA_CERT, "mountPath": APP_CA_DIR, "readOnly": True}]
    if cfg.ca_bundle:
        mounts.append({"name": VOL_BUNDLE, "mountPath": APP_BUNDLE_DIR, "readOnly": True})
    return mounts


def _init_container(cfg: SidecarConfig) -> dict[str, Any]:
    """Copies the CA out of its Secret into a memory emptyDir with mode 0600
    for the key (sidekey refuses a group-readable key, and a Secret volume is
    root-owned or group-readable), checks it loads, writes the app's trust
    bundle. sidekey itself, exec form: no shell in the image is needed, and
    `--from` never creates a CA in place of a missing one."""
    args = ["ca", "--certs", CA_DIR, "--from", CA_SECRET_DIR]
    if cfg.ca_bundle:
        args += ["--bundle", "/bundle/ca-bundle.pem"]
    mounts: list[dict[str, Any]] = [
        {"name": VOL_CA_SECRET, "mountPath": CA_SECRET_DIR, "readOnly": True},
        {"name": VOL_CA, "mountPath": CA_DIR},
    ]
    if cfg.ca_bundle:
        mounts.append({"name": VOL_BUNDLE, "mountPath": "/bundle"})
    return {
        "name": INIT,
        "image": cfg.image,
        "imagePullPolicy": cfg.pull_policy,
        "command": ["sidekey"],
        "args": args,
        "resources": cfg.init_resources,
        "securityContext": cfg.security_context,
        "volumeMounts": mounts,
    }


def _probes(cfg: SidecarConfig) -> dict[str, Any]:
    """kubelet's httpGet on the metrics listener (the pod IP, no token): the
    admin listener is on 127.0.0.1, which kubelet never reaches."""
    p = cfg.probes
    ready = {"httpGet": {"path": "/readyz", "port": METRICS_PORT_NAME}}
    live = {"httpGet": {"path": "/healthz", "port": METRICS_PORT_NAME}}
    return {
        "startupProbe": {**ready, **p["startup"]},
        "readinessProbe": {**ready, **p["readiness"]},
        "livenessProbe": {**live, **p["liveness"]},
    }


_WAIT_SCRIPT = """\
import socket, time
deadline = time.monotonic() + {seconds}
while time.monotonic() < deadline:
    try:
        socket.create_connection(("127.0.0.1", {port}), 1).close()
        break
    except OSError:
        time.sleep(0.2)
"""


def _lifecycle(cfg: SidecarConfig) -> dict[str, Any]:
    """Regular-container mode only: hold the app's start until sidekey listens
    (kubelet starts the next container when postStart returns), and an
    optional pause before the drain."""
    if cfg.native:
        return {}
    hooks: dict[str, Any] = {}
    if cfg.wait_for_proxy_seconds > 0:
        script = _WAIT_SCRIPT.format(seconds=cfg.wait_for_proxy_seconds, port=cfg.port)
        hooks["postStart"] = {"exec": {"command": ["python3", "-c", script]}}
    if cfg.pre_stop_sleep_seconds > 0:
        hooks["preStop"] = {"exec": {"command": ["sleep", str(cfg.pre_stop_sleep_seconds)]}}
    return {"lifecycle": hooks} if hooks else {}


def _sidecar_container(cfg: SidecarConfig) -> dict[str, Any]:
    args = [
        "run", "--policies", "/etc/sidekey/policies.yaml", "--listen", f"127.0.0.1:{cfg.port}",
        "--admin", f"127.0.0.1:{cfg.admin_port}", "--metrics-listen", f"0.0.0.0:{cfg.metrics_port}",
        "--certs", CA_DIR, "--grace", cfg.grace, *cfg.extra_args,
    ]  # fmt: skip
    container: dict[str, Any] = {"name": SIDECAR, "image": cfg.image, "imagePullPolicy": cfg.pull_policy}
    if cfg.native:
        container["restartPolicy"] = "Always"
    container["command"] = ["sidekey"]
    container["args"] = args
    container["ports"] = [{"name": METRICS_PORT_NAME, "containerPort": cfg.metrics_port, "protocol": "TCP"}]
    container["env"] = [
        {"name": "SIDEKEY_LOG_LEVEL", "value": cfg.log_level},
        # The admin API requires it in a pod, even on loopback (the app shares loopback).
        {
            "name": ADMIN_TOKEN_ENV,
            "valueFrom": {"secretKeyRef": {"name": cfg.admin_token_secret, "key": cfg.admin_token_key}},
        },
    ]
    if cfg.provider_secret and cfg.provider_secrets_as_env:
        container["envFrom"] = [{"secretRef": {"name": cfg.provider_secret}}]
    container.update(_probes(cfg))
    container.update(_lifecycle(cfg))
    container["resources"] = cfg.resources
    container["securityContext"] = cfg.security_context
    mounts: list[dict[str, Any]] = [
        {"name": VOL_POLICY, "mountPath": "/etc/sidekey", "readOnly": True},
        {"name": VOL_CA, "mountPath": CA_DIR, "readOnly": True},
    ]
    if cfg.provider_secret and not cfg.provider_secrets_as_env:
        mounts.append({"name": VOL_PROVIDERS, "mountPath": PROVIDER_DIR, "readOnly": True})
    mounts.append({"name": VOL_TMP, "mountPath": "/tmp"})  # leaf certs staged here; the root fs is read-only
    container["volumeMounts"] = mounts
    return container


def _volumes(cfg: SidecarConfig) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": VOL_POLICY, "configMap": {"name": cfg.policy_configmap}},
        # The whole CA Secret (cert + key), mounted in sidekey-init only. 0444 so that
        # sidekey-init's uid reads it without the pod's fsGroup (which inject must
        # not change): no other container mounts this volume.
        {"name": VOL_CA_SECRET, "secret": {"secretName": cfg.ca_secret, "defaultMode": 0o444}},
        # sidekey's private copy of the CA, in memory: sidekey-init and sidekey only.
        {"name": VOL_CA, "emptyDir": {"medium": "Memory", "sizeLimit": "1Mi"}},
        # The app's view of the CA Secret: the certificate item, never the key.
        {
            "name": VOL_CA_CERT,
            "secret": {
                "secretName": cfg.ca_secret,
                "defaultMode": 0o444,
                "items": [{"key": "sidekey-ca.pem", "path": "sidekey-ca.pem"}],
            },
        },
    ]
    if cfg.ca_bundle:
        volumes.append({"name": VOL_BUNDLE, "emptyDir": {"sizeLimit": "8Mi"}})
    if cfg.provider_secret and not cfg.provider_secrets_as_env:
        # 0444 for the same reason as the CA Secret: only the sidekey container mounts it.
        volumes.append({"name": VOL_PROVIDERS, "secret": {"secretName": cfg.provider_secret, "defaultMode": 0o444}})
    volumes.append({"name": VOL_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": "16Mi"}})
    return volumes
