"""Every credential source in one sidekey (static env:, vault:, aws-sm:,
azure-kv:, oauth2): the admin view of each (source, state, expiry, last
refresh; never a value), the refresh metrics, a forced re-read after a
rotation, and the secrets sweep: no value, store token, client secret or
access token in the DEBUG log, audit (bodies on), dead letters, metrics,
/providers or /policy."""

from __future__ import annotations

import json
import time
from pathlib import Path

import boto3
import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.provider import FakeProviderThread
from tests.fakes.stores import FakeAzureKeyVault, FakeTokenEndpoint, FakeVault, MotoTLSServer
from tests.integration.conftest import OPENAI_KEY, SECRET_ENV
from tests.integration.polling import DEADLINE, fetch
from tests.integration.sidekey_process import SidekeyProcess

VAULT_KEY, VAULT_ROTATED, SECRET_ID = "sk-vault-SWEEP-11aa", "sk-vault-SWEEP-ROTATED-22bb", "approle-SWEEP-33cc"
AWS_KEY, AZURE_KEY = "sk-aws-SWEEP-44dd", "sk-azure-SWEEP-55ee"
CLIENT_SECRET = "oauth-SWEEP-CLIENT-66ff"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIASWEEPFAKE", "AWS_SECRET_ACCESS_KEY": "aws-SWEEP-SECRET-ACCESS-77gg"}
SIGV4_ID, SIGV4_SECRET, SIGV4_TOKEN = "AKIASWEEPSIGV4", "sigv4-SWEEP-SECRET-88hh", "sigv4-SWEEP-TOKEN-99ii"
SIGNED = ('{type: aws-sigv4, service: bedrock, region: us-east-1, credentials: {access_key_id: env:SIGV4_KEY_ID, '
          'secret_access_key: "vault:secret/data/sigv4#secret", session_token: env:SIGV4_TOKEN}}')  # fmt: skip


def admin(proxy: SidekeyProcess, method: str, path: str) -> httpx.Response:
    return httpx.request(method, proxy.admin_url + path, timeout=DEADLINE, trust_env=False)


def provider(fake: FakeProviderThread, name: str, auth: str) -> str:
    return f"""\
  {name}:
    hosts: [api.{name}.test]
    upstream: https://localhost:{fake.port}
    auth: {auth}
    tls: {{ca_bundle: {fake.ca_pem_path}}}
    retry: {{attempts: 1}}
"""


def test_every_source_admin_view_metrics_refresh_and_sweep(start_sidekey: object, fake: FakeProviderThread,
                                                          tmp_path: Path) -> None:  # fmt: skip
    with FakeVault() as vault, MotoTLSServer() as moto, FakeAzureKeyVault() as kv, \
            FakeTokenEndpoint("sidekey-app", CLIENT_SECRET) as oauth:  # fmt: skip
        vault.put("secret", "sweep", {"api_key": VAULT_KEY})
        vault.approles["sidekey"] = SECRET_ID
        vault.put("secret", "sigv4", {"secret": SIGV4_SECRET})
        sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto.url, verify=str(moto.ca_pem_path),
                          aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
        sm.create_secret(Name="sweep", SecretString=json.dumps({"key": AWS_KEY}))
        sm.close()
        kv.put("sweep", AZURE_KEY)
        audit, dlq = tmp_path / "audit.jsonl", tmp_path / "dlq.jsonl"
        policy = f"""\
version: 1
secret_stores:
{vault.store_yaml("{method: approle, role_id: sidekey, secret_id: env:VAULT_SECRET_ID}")}  aws_sm: {{region: us-east-1, endpoint_url: "{moto.url}", ca_bundle: {moto.ca_pem_path}}}
  azure_kv: {{vault_url: "{kv.vault_url}", ca_bundle: {kv.ca_pem_path}}}
providers:
{provider(fake, "static", "{type: bearer, secret: env:OPENAI_API_KEY}")}\
{provider(fake, "vaulted", '{type: bearer, secret: "vault:secret/data/sweep#api_key"}')}\
{provider(fake, "aws", '{type: header, header: x-api-key, secret: "aws-sm:sweep#key"}')}\
{provider(fake, "azure", "{type: query, param: key, secret: azure-kv:sweep}")}\
{provider(fake, "signed", SIGNED)}\
{provider(fake, "oauth", f'{{type: oauth2, token_url: "{oauth.token_url}", client_id: sidekey-app, client_secret: env:CLIENT_SECRET, ca_bundle: {oauth.ca_pem_path}}}')}"""
        env = {
            **SECRET_ENV,
            **AWS_ENV,
            **kv.identity_env(),
            "VAULT_SECRET_ID": SECRET_ID,
            "CLIENT_SECRET": CLIENT_SECRET,
            "SIGV4_KEY_ID": SIGV4_ID,
            "SIGV4_TOKEN": SIGV4_TOKEN,
        }
        proxy: SidekeyProcess = start_sidekey(policy, env=env, args=("--audit", str(audit), "--audit-bodies",
                                                                      "--dlq", str(dlq)))  # type: ignore[operator]  # fmt: skip
        expected = {"static": f"Bearer {OPENAI_KEY}", "vaulted": f"Bearer {VAULT_KEY}", "aws": AWS_KEY}
        for name in ("static", "vaulted", "aws", "azure", "signed", "oauth"):
            answer = fetch(proxy, f"https://api.{name}.test/echo?q=1")
            assert answer.status == 200, (name, answer)
            seen = fake.last()
            if name in expected:
                assert expected[name] in (seen.header("Authorization"), seen.header("x-api-key"))
            elif name == "azure":
                assert seen.query == f"q=1&key={AZURE_KEY}"
            elif name == "signed":
                assert (seen.header("Authorization") or "").startswith(f"AWS4-HMAC-SHA256 Credential={SIGV4_ID}/")
                assert seen.header("X-Amz-Security-Token") == SIGV4_TOKEN
            else:
                assert seen.header("Authorization") == f"Bearer {oauth.issued[0]}"
            # a failed request is dead-lettered (its entry must hold no credential either)
            fetch(proxy, f"https://api.{name}.test/status/500")

        views = {p["name"]: p for p in admin(proxy, "GET", "/providers").json()["providers"]}
        cred = {name: views[name]["credentials"][0] for name in views}
        assert cred["static"]["source"] == "env:OPENAI_API_KEY" and cred["static"]["state"] == "fresh"
        assert cred["vaulted"]["source"] == "vault:secret/data/sweep#api_key"
        assert cred["aws"]["source"] == "aws-sm:sweep#key" and cred["azure"]["source"] == "azure-kv:sweep"
        assert cred["oauth"]["source"] == "oauth2:oauth"
        signed = {c["source"]: c["state"] for c in views["signed"]["credentials"]}  # the AWS key's three parts
        assert signed == {
            "env:SIGV4_KEY_ID": "fresh",
            "vault:secret/data/sigv4#secret": "fresh",
            "env:SIGV4_TOKEN": "fresh",
        }
        for name in ("vaulted", "aws", "azure", "oauth"):
            c = cred[name]
            assert c["state"] == "fresh" and c["failures"] == 0 and c["refreshes"]["ok"] >= 1, (name, c)
            assert c["last_refresh"] is not None and abs(c["last_refresh"] - time.time()) < DEADLINE + 3600
        assert abs(cred["oauth"]["expires_at"] - (time.time() + 3600)) < DEADLINE
        assert cred["oauth"]["token_url"] == oauth.token_url

        # A rotation in the store, picked up at once on request (the ttl is the default 5 minutes).
        vault.put("secret", "sweep", {"api_key": VAULT_ROTATED})
        refreshed = admin(proxy, "POST", "/credentials/refresh?provider=vaulted")
        assert refreshed.status_code == 200
        assert refreshed.json()["refreshed"] == [
            {"provider": "vaulted", "source": "vault:secret/data/sweep#api_key", "result": "ok", "state": "fresh"}
        ]
        assert fetch(proxy, "https://api.vaulted.test/echo").status == 200
        assert fake.last().header("Authorization") == f"Bearer {VAULT_ROTATED}"
        assert admin(proxy, "POST", "/credentials/refresh?provider=nope").status_code == 404

        metrics = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for f in text_string_to_metric_families(admin(proxy, "GET", "/metrics").text) for s in f.samples}  # fmt: skip
        assert metrics[("sidekey_credential_refresh_total", (("provider", "vaulted"), ("result", "ok")))] >= 2
        assert metrics[("sidekey_credential_refresh_total", (("provider", "oauth"), ("result", "ok")))] == 1
        assert (
            abs(metrics[("sidekey_credential_expiry_seconds", (("provider", "oauth"),))] - cred["oauth"]["expires_at"])
            < 1
        )
        assert ("sidekey_credential_expiry_seconds", (("provider", "static"),)) not in metrics

        deadline = time.monotonic() + DEADLINE
        while not (dlq.exists() and len(dlq.read_text().splitlines()) >= 6):
            assert time.monotonic() < deadline, "dead letters not written"
            time.sleep(0.1)
        surfaces = {
            "log": proxy.log(), "audit": audit.read_text(), "dlq": dlq.read_text(),
            "metrics": admin(proxy, "GET", "/metrics").text, "providers": admin(proxy, "GET", "/providers").text,
            "policy": admin(proxy, "GET", "/policy").text,
        }  # fmt: skip
        proxy.stop()  # before the fakes close
        surfaces["log"] = proxy.log()
        secrets = (OPENAI_KEY, VAULT_KEY, VAULT_ROTATED, SECRET_ID, *vault.tokens, AWS_KEY,
                   AWS_ENV["AWS_SECRET_ACCESS_KEY"], AZURE_KEY, kv.identity_header, *kv.tokens, CLIENT_SECRET,
                   *oauth.issued, SIGV4_SECRET, SIGV4_TOKEN)  # fmt: skip
        for where, text in surfaces.items():
            for secret in secrets:
                assert secret not in text, f"a secret reached the {where}"
