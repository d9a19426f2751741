"""Credentials from AWS Secrets Manager (moto's server: the real HTTP API)
and Azure Key Vault (a fake of its secrets API and the managed identity
endpoint) through a real sidekey, logging at DEBUG: the vendors' SDKs log
bodies at DEBUG, and no secret may reach the log."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import boto3
import pytest

from tests.fakes.provider import FakeProviderThread
from tests.fakes.stores import FakeAzureKeyVault, MotoTLSServer
from tests.integration.conftest import SECRET_ENV
from tests.integration.polling import DEADLINE, fetch

AWS_PLAIN = "sk-aws-PLAIN-1f2e3d4c"
AWS_JSON_KEY = "sk-aws-JSONKEY-5b6a7988"
AWS_ROTATED = "sk-aws-ROTATED-0c0d0e0f"
AZURE_KEY = "sk-azure-FIRST-a1a2a3a4"
AZURE_ROTATED = "sk-azure-ROTATED-b5b6b7b8"
AWS_ENV = {"AWS_ACCESS_KEY_ID": "AKIAFAKEFORTESTS", "AWS_SECRET_ACCESS_KEY": "aws-SECRET-ACCESS-KEY-fake-9z9z"}


def wait_until(check: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def provider(fake: FakeProviderThread, name: str, secret: str) -> str:
    return f"""\
  {name}:
    hosts: [api.{name}.test]
    upstream: https://localhost:{fake.port}
    auth: {{type: bearer, secret: "{secret}"}}
    tls: {{ca_bundle: {fake.ca_pem_path}}}
    retry: {{attempts: 1}}
"""


def bearer(fake: FakeProviderThread, proxy: object, name: str) -> str | None:
    answer = fetch(proxy, f"https://api.{name}.test/echo")  # type: ignore[arg-type]
    assert answer.status == 200, answer
    return fake.last().header("Authorization")


@pytest.fixture
def moto() -> Iterator[MotoTLSServer]:
    with MotoTLSServer() as server:
        yield server


def test_aws_secrets_manager_string_json_key_and_rotation(start_sidekey: object, fake: FakeProviderThread,
                                                          moto: MotoTLSServer) -> None:  # fmt: skip
    sm = boto3.client("secretsmanager", region_name="us-east-1", endpoint_url=moto.url, verify=str(moto.ca_pem_path),
                      aws_access_key_id="x", aws_secret_access_key="x")  # fmt: skip
    try:
        sm.create_secret(Name="prod/plain", SecretString=AWS_PLAIN)
        arn = sm.create_secret(Name="prod/json", SecretString=json.dumps({"api_key": AWS_JSON_KEY, "n": 1}))["ARN"]
        policy = f"""\
version: 1
secret_stores:
  aws_sm: {{region: us-east-1, endpoint_url: "{moto.url}", ca_bundle: {moto.ca_pem_path}, ttl: 1s}}
providers:
{provider(fake, "plain", "aws-sm:prod/plain")}{provider(fake, "byarn", f"aws-sm:{arn}#api_key")}"""
        proxy = start_sidekey(policy, env={**SECRET_ENV, **AWS_ENV})  # type: ignore[operator]  # logs at DEBUG
        assert bearer(fake, proxy, "plain") == f"Bearer {AWS_PLAIN}"
        assert bearer(fake, proxy, "byarn") == f"Bearer {AWS_JSON_KEY}"
        sm.put_secret_value(SecretId="prod/plain", SecretString=AWS_ROTATED)
        wait_until(lambda: bearer(fake, proxy, "plain") == f"Bearer {AWS_ROTATED}", "the rotated secret")
        log = proxy.log()
        for secret in (AWS_PLAIN, AWS_JSON_KEY, AWS_ROTATED, AWS_ENV["AWS_SECRET_ACCESS_KEY"]):
            assert secret not in log, "a secret reached the DEBUG log"
    finally:
        sm.close()


def test_azure_key_vault_with_managed_identity_and_rotation(start_sidekey: object, fake: FakeProviderThread) -> None:
    with FakeAzureKeyVault() as kv:
        kv.put("openai-key", AZURE_KEY)
        pinned = kv.put("pinned-key", AZURE_KEY)
        kv.put("pinned-key", AZURE_ROTATED)
        policy = f"""\
version: 1
secret_stores:
  azure_kv: {{vault_url: "{kv.vault_url}", ca_bundle: {kv.ca_pem_path}, ttl: 1s}}
providers:
{provider(fake, "azure", "azure-kv:openai-key")}{provider(fake, "pinned", f"azure-kv:pinned-key/{pinned}")}"""
        proxy = start_sidekey(policy, env={**SECRET_ENV, **kv.identity_env()})  # type: ignore[operator]  # logs at DEBUG
        assert bearer(fake, proxy, "azure") == f"Bearer {AZURE_KEY}"
        assert bearer(fake, proxy, "pinned") == f"Bearer {AZURE_KEY}", "a pinned version stays"
        kv.put("openai-key", AZURE_ROTATED)
        wait_until(lambda: bearer(fake, proxy, "azure") == f"Bearer {AZURE_ROTATED}", "the rotated secret")
        assert kv.token_requests >= 1 and kv.reads >= 3
        proxy.stop()  # before the fake vault closes
        log = proxy.log()
        assert "azure.core" not in log, "the SDK's request lines are held back (they name every URL)"
        for secret in (AZURE_KEY, AZURE_ROTATED, kv.identity_header, *kv.tokens):
            assert secret not in log, "a secret reached the DEBUG log"
