"""Credentials from HashiCorp Vault (KV v2) through a real sidekey: each
auth method, rotation within ttl, an outage served stale then refused, and
an upstream 401 that re-reads the key once. The fake Vault is checked
against hvac, Vault's own Python client, so it answers as Vault does."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import hvac
import pytest

from tests.fakes.provider import FakeProviderThread
from tests.fakes.stores import FakeVault
from tests.integration.conftest import SECRET_ENV
from tests.integration.polling import DEADLINE, fetch
from tests.integration.sidekey_process import SidekeyProcess

KEY_V1 = "sk-vault-FIRST-0a1b2c3d"
KEY_V2 = "sk-vault-SECOND-4e5f6a7b"
SECRET_ID = "approle-SECRET-ID-77aa"
K8S_JWT = "eyJhbGciOiJSUzI1NiJ9.K8S-SA-JWT.sig-5c5c"


@pytest.fixture
def vault() -> Iterator[FakeVault]:
    with FakeVault() as v:
        v.put("secret", "openai", {"api_key": KEY_V1, "org": "org-1"})
        v.approles["sidekey-role"] = SECRET_ID
        v.k8s_roles["sidekey"] = K8S_JWT
        yield v


def vault_policy(
    fake: FakeProviderThread, vault: FakeVault, auth: str, *, ttl: str = "1h", stale_for: str = "1h"
) -> str:
    return f"""\
version: 1
secret_stores:
{vault.store_yaml(auth, f"ttl: {ttl}", f"stale_for: {stale_for}")}providers:
  vaulted:
    hosts: [api.vaulted.test]
    upstream: https://localhost:{fake.port}
    auth: {{type: bearer, secret: "vault:secret/data/openai#api_key"}}
    tls: {{ca_bundle: {fake.ca_pem_path}}}
    retry: {{attempts: 1}}
"""


def bearer(fake: FakeProviderThread, proxy: SidekeyProcess, path: str = "/echo") -> str | None:
    answer = fetch(proxy, f"https://api.vaulted.test{path}")
    assert answer.status == 200, answer
    return fake.last().header("Authorization")


def wait_until(check: object, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_fake_vault_answers_hvac_as_vault_does(vault: FakeVault) -> None:
    clients: list[hvac.Client] = []
    try:
        check_with_hvac(vault, clients)
    finally:
        for c in clients:
            c.adapter.close()


def check_with_hvac(vault: FakeVault, clients: list[hvac.Client]) -> None:
    def new(**kwargs: str) -> hvac.Client:
        clients.append(hvac.Client(url=vault.url, verify=str(vault.ca_pem_path), **kwargs))
        return clients[-1]

    client = new()
    login = client.auth.approle.login(role_id="sidekey-role", secret_id=SECRET_ID)
    assert login["auth"]["client_token"] in vault.tokens and client.is_authenticated()
    read = client.secrets.kv.v2.read_secret_version(path="openai", mount_point="secret", raise_on_deleted_version=True)
    assert read["data"]["data"]["api_key"] == KEY_V1 and read["data"]["metadata"]["version"] == 1
    k8s = new()
    k8s.auth.kubernetes.login(role="sidekey", jwt=K8S_JWT)
    assert (
        k8s.secrets.kv.v2.read_secret_version(path="openai", raise_on_deleted_version=True)["data"]["data"]["org"]
        == "org-1"
    )
    with pytest.raises(hvac.exceptions.Forbidden):
        new(token="hvs.not-a-token").secrets.kv.v2.read_secret_version(path="openai", raise_on_deleted_version=True)
    with pytest.raises(hvac.exceptions.InvalidPath):
        client.secrets.kv.v2.read_secret_version(path="missing", raise_on_deleted_version=True)
    assert ("POST", "/v1/auth/approle/login") in vault.requests and ("GET", "/v1/secret/data/openai") in vault.requests


def test_kubernetes_login_and_rotation_within_ttl(start_sidekey: object, fake: FakeProviderThread, vault: FakeVault,
                                                  tmp_path: Path) -> None:  # fmt: skip
    jwt = tmp_path / "sa-token"
    jwt.write_text(K8S_JWT + "\n")
    auth = f"{{method: kubernetes, role: sidekey, jwt: file:{jwt}}}"
    proxy = start_sidekey(vault_policy(fake, vault, auth, ttl="1s"))  # type: ignore[operator]
    assert bearer(fake, proxy) == f"Bearer {KEY_V1}"
    assert vault.logins == 1
    rotated_at = time.monotonic()
    vault.put("secret", "openai", {"api_key": KEY_V2})
    wait_until(lambda: bearer(fake, proxy) == f"Bearer {KEY_V2}", "the rotated key")
    # The background re-read comes every ttl (1 s): the new key shows within about that,
    # plus what a loaded machine adds; far sooner than the deadline in any case.
    assert time.monotonic() - rotated_at < DEADLINE
    assert vault.logins == 1, "the login's token is reused while its lease lasts"
    for text in (proxy.log(),):
        for secret in (KEY_V1, KEY_V2, K8S_JWT, *vault.tokens):
            assert secret not in text


def test_outage_serves_stale_then_refuses_then_recovers(start_sidekey: object, fake: FakeProviderThread,
                                                        vault: FakeVault) -> None:  # fmt: skip
    env = {**SECRET_ENV, "VAULT_TOKEN": vault.root_token}
    proxy = start_sidekey(
        vault_policy(fake, vault, "{method: token, token: env:VAULT_TOKEN}", ttl="1s", stale_for="8s"), env=env
    )  # type: ignore[operator]
    assert bearer(fake, proxy) == f"Bearer {KEY_V1}"
    vault.pause()
    down_at = time.monotonic()
    # The last good value is served while the store is unreachable ...
    assert bearer(fake, proxy) == f"Bearer {KEY_V1}"
    # ... for at most ttl + stale_for after the last good read, then 503.
    wait_until(lambda: fetch(proxy, "https://api.vaulted.test/echo").status == 503, "the refusal")
    assert time.monotonic() - down_at > 8 - 1  # never before stale_for ran out (the read was < ttl before)
    refused = fetch(proxy, "https://api.vaulted.test/echo")
    assert refused.status == 503 and json.loads(refused.body)["error"]["code"] == "credential_unavailable"
    vault.put("secret", "openai", {"api_key": KEY_V2})
    vault.resume()
    wait_until(lambda: fetch(proxy, "https://api.vaulted.test/echo").status == 200, "recovery without a restart")
    assert fake.last().header("Authorization") == f"Bearer {KEY_V2}"
    assert "credential vault:secret/data/openai#api_key" in proxy.log() and vault.root_token not in proxy.log()


def test_upstream_401_rereads_the_key_once(start_sidekey: object, vault: FakeVault) -> None:
    with FakeProviderThread(expected_key=KEY_V2) as strict:
        env = {**SECRET_ENV, "VAULT_SECRET_ID": SECRET_ID}
        auth = "{method: approle, role_id: sidekey-role, secret_id: env:VAULT_SECRET_ID}"
        proxy = start_sidekey(vault_policy(strict, vault, auth), env=env)  # type: ignore[operator]
        assert fetch(proxy, "https://api.vaulted.test/v1/models").status == 401  # the store still has the old key
        assert len(strict.provider.received) == 1, "the same value re-read: no second attempt"
        vault.put("secret", "openai", {"api_key": KEY_V2})  # rotated in the store; sidekey's ttl is an hour
        answer = fetch(proxy, "https://api.vaulted.test/v1/models")
        assert answer.status == 200, answer
        seen = [r.header("Authorization") for r in strict.provider.received[1:]]
        assert seen == [f"Bearer {KEY_V1}", f"Bearer {KEY_V2}"], "one re-read, one more attempt"
        strict.provider.expected_key = "sk-something-else"
        assert fetch(proxy, "https://api.vaulted.test/v1/models").status == 401
        assert len(strict.provider.received) == 4, "a refused key is re-read once, never in a loop"
        proxy.stop()  # before this fake closes (see the start_sidekey fixture)


def test_rotation_new_requests_take_the_new_key_in_flight_finish_with_the_old(
    start_sidekey: object, fake: FakeProviderThread, vault: FakeVault
) -> None:
    env = {**SECRET_ENV, "VAULT_TOKEN": vault.root_token}
    proxy: SidekeyProcess = start_sidekey(vault_policy(fake, vault, "{method: token, token: env:VAULT_TOKEN}"),
                                          env=env)  # type: ignore[operator]  # fmt: skip
    fake.call(lambda p: p.arm_gate())  # the fake pauses a stream after its first event until released
    events: list[str] = []
    statuses: list[int] = []

    def stream() -> None:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(proxy=proxy.url, verify=proxy.client_ssl_context(), timeout=DEADLINE, trust_env=False) as c:
            with c.stream("POST", "https://api.vaulted.test/v1/chat/completions", json=body) as r:
                statuses.append(r.status_code)
                events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        wait_until(lambda: any(r.path == "/v1/chat/completions" for r in fake.provider.received), "the stream")
        vault.put("secret", "openai", {"api_key": KEY_V2})
        refreshed = httpx.post(
            proxy.admin_url + "/credentials/refresh?provider=vaulted", timeout=DEADLINE, trust_env=False
        )
        assert refreshed.json()["refreshed"][0]["result"] == "ok"
        assert bearer(fake, proxy) == f"Bearer {KEY_V2}", "a new request takes the new key"
    finally:
        fake.call(lambda p: p.release_gate())
        worker.join(DEADLINE)
    assert statuses == [200] and events and events[-1] == "[DONE]", "the stream in flight finished"
    [chat] = [r for r in fake.provider.received if r.path == "/v1/chat/completions"]
    assert chat.header("Authorization") == f"Bearer {KEY_V1}", "it was sent with the key of its time"
