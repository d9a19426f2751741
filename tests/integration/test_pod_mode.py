"""The sidecar's two faces: a metrics listener Prometheus and the kubelet can
reach without a token, and an admin API that, inside a pod, wants its token
even on loopback (the app containers share that loopback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import SECRET_ENV, assert_no_secret, curl, policy_for
from tests.integration.sidekey_process import REPO, SidekeyProcess

TOKEN = "adm-pod-tok-7"
_METRICS = re.compile(r"metrics listening on 127\.0\.0\.1:(\d+)")


def metrics_port(proxy: SidekeyProcess) -> int:
    found = _METRICS.search(proxy.log())
    assert found, "no metrics listener announced"
    return int(found.group(1))


def get(port: int, path: str, token: str | None = None, method: str = "GET") -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, f"http://127.0.0.1:{port}{path}", headers=headers, timeout=10, trust_env=False)


def test_metrics_listener_serves_scrapes_and_probes_only(start_sidekey: object, fake: FakeProviderThread) -> None:
    env = {**SECRET_ENV, "SIDEKEY_ADMIN_TOKEN": TOKEN}
    proxy = start_sidekey(policy_for(fake), env=env, args=("--metrics-listen", "127.0.0.1:0"))  # type: ignore[operator]
    port = metrics_port(proxy)
    assert curl(proxy, "-s", "-o", "/dev/null", "https://api.openai.com/v1/models").returncode == 0
    scrape = get(port, "/metrics")  # no token, although the admin API has one
    assert scrape.status_code == 200
    assert "sidekey_requests_total{" in scrape.text and 'provider="openai"' in scrape.text
    assert_no_secret(scrape.text)
    assert get(port, "/healthz").json() == {"status": "ok"}
    assert get(port, "/readyz").status_code == 200
    # Nothing that shows the policy, usage or providers, or changes state.
    for method, path in (("GET", "/providers"), ("GET", "/policy"), ("GET", "/usage"), ("POST", "/policy/reload")):
        assert get(port, path, method=method).status_code in (404, 405), path
        assert get(port, path, TOKEN, method=method).status_code in (404, 405), path
    # The admin API keeps its token, and the proxy never reaches either listener.
    assert get(proxy.admin_port, "/metrics").status_code == 401
    through = curl(proxy, "-s", f"http://127.0.0.1:{port}/metrics")
    assert '"address_blocked"' in through.stdout


def test_in_a_pod_the_admin_api_wants_its_token_on_loopback(start_sidekey: object, fake: FakeProviderThread) -> None:
    env = {**SECRET_ENV, "SIDEKEY_ADMIN_TOKEN": TOKEN, "KUBERNETES_SERVICE_HOST": "10.96.0.1"}
    proxy = start_sidekey(policy_for(fake), env=env)  # type: ignore[operator]
    for path in ("/providers", "/policy", "/usage", "/metrics"):
        assert get(proxy.admin_port, path).status_code == 401, path
    assert get(proxy.admin_port, "/policy/reload", method="POST").status_code == 401
    assert get(proxy.admin_port, "/providers", "wrong-token").status_code == 401
    assert get(proxy.admin_port, "/providers", TOKEN).status_code == 200


@pytest.mark.parametrize(
    ("extra_env", "extra_args"),
    [({"KUBERNETES_SERVICE_HOST": "10.96.0.1"}, ()), ({}, ("--admin-require-token",)),
     ({"SIDEKEY_ADMIN_REQUIRE_TOKEN": "1"}, ())],
    ids=["in-a-pod", "flag", "env"],
)  # fmt: skip
def test_pod_mode_without_a_token_refuses_to_start(
    tmp_path: Path, fake: FakeProviderThread, extra_env: dict[str, str], extra_args: tuple[str, ...]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(policy_for(fake))
    cmd = [sys.executable, "-m", "proxy", "run", "--listen", "127.0.0.1:0", "--policies", str(policy),
           "--certs", str(tmp_path / "certs"), "--admin", "127.0.0.1:0", *extra_args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "SIDEKEY_ADMIN_TOKEN"} | SECRET_ENV | extra_env
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    assert "requires a token even on loopback" in result.stderr
    assert "listening" not in result.stderr  # refused before announcing anything
