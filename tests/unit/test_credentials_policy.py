"""secret_stores:, store references and auth type oauth2 in the policy:
typed results, and problems with file, line and field that never quote a value."""

from __future__ import annotations

import pytest

from proxy.policy import SecretRef
from proxy.policy.credential_model import StaticRef, VaultAuth
from proxy.policy.load import PolicyError, parse_policy

STORES = """\
version: 1
secret_stores:
  vault:
    address: https://vault.internal:8200
    auth: {method: approle, role_id: sidekey, secret_id: env:VAULT_SECRET_ID}
    ttl: 5m
    stale_for: 1h
  aws_sm: {region: eu-west-1}
  azure_kv: {vault_url: "https://corp.vault.azure.net"}
providers:
  a:
    hosts: [a.test]
    auth: {type: bearer, secret: "vault:secret/data/openai#api_key"}
  b:
    hosts: [b.test]
    auth: {type: header, header: x-api-key, secret: "aws-sm:arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/b-AbCdEf#key"}
  c:
    hosts: [c.test]
    auth: {type: bearer, secret: azure-kv:c-key}
  d:
    hosts: [d.test]
    auth: {type: oauth2, token_url: "https://login.example.com/oauth2/token", client_id: sidekey,
           client_secret: "vault:secret/data/d#client_secret", scope: "api.read", auth_method: post}
"""


def test_stores_and_references_parse_typed() -> None:
    policy = parse_policy(STORES)
    vault = policy.secret_stores.vault
    assert vault is not None and vault.address == "https://vault.internal:8200"
    assert vault.auth == VaultAuth(
        "approle", role_id="sidekey", secret_id=StaticRef("env", "VAULT_SECRET_ID"), mount="approle"
    )
    assert (vault.timing.ttl, vault.timing.stale_for) == (300, 3600)
    assert policy.secret_stores.aws_sm is not None and policy.secret_stores.aws_sm.region == "eu-west-1"
    a, b, c, d = policy.providers
    assert a.auth.secret == SecretRef("vault", "secret/data/openai", "api_key")
    assert a.auth.secret.source == "vault:secret/data/openai#api_key"
    assert b.auth.secret == SecretRef(
        "aws-sm", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:prod/b-AbCdEf", "key"
    )
    assert c.auth.secret == SecretRef("azure-kv", "c-key")
    assert d.auth.type == "oauth2" and d.auth.secret == SecretRef("oauth2", "d") and d.auth.oauth2 is not None
    assert d.auth.oauth2.client_secret == SecretRef("vault", "secret/data/d", "client_secret")
    assert d.auth.oauth2.auth_method == "post" and d.auth.oauth2.grant == "client_credentials"


def problems(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text)
    return [(p.line, p.field, p.message) for p in info.value.problems]


PROVIDER = "version: 1\n{stores}providers:\n  p:\n    hosts: [p.test]\n    auth: {auth}\n"


@pytest.mark.parametrize(
    ("stores", "auth", "line", "field", "words"),
    [
        (
            "",
            '{type: bearer, secret: "vault:secret/data/x#k"}',
            5,
            "providers.p.auth.secret",
            "need secret_stores.vault",
        ),
        ("", "{type: bearer, secret: azure-kv:x}", 5, "providers.p.auth.secret", "need secret_stores.azure_kv"),
        (
            "secret_stores:\n  vault: {address: https://v:8200, auth: {method: token, token: env:T}}\n",
            '{type: bearer, secret: "vault:secret/data/x"}',
            7,
            "providers.p.auth.secret",
            "vault:MOUNT/data/PATH#FIELD",
        ),
        (
            "secret_stores:\n  vault: {address: http://v:8200, auth: {method: token, token: env:T}}\n",
            "{type: none}",
            3,
            "secret_stores.vault.address",
            "must be https",
        ),
        (
            "secret_stores:\n  vault: {address: https://v:8200, auth: {method: approle, role_id: r}}\n",
            "{type: none}",
            3,
            "secret_stores.vault.auth.secret_id",
            "required for method approle",
        ),
        (
            "secret_stores:\n  vault: {address: https://v:8200, auth: {method: token, token: hvs.LITERAL-TOKEN}}\n",
            "{type: none}",
            3,
            "secret_stores.vault.auth.token",
            "literal secrets are not allowed",
        ),
        ("secret_stores:\n  aws_sm: {region: Mars}\n", "{type: none}", 3, "secret_stores.aws_sm.region", "AWS region"),
        (
            "",
            "{type: oauth2, token_url: https://t/x, client_id: c}",
            5,
            "providers.p.auth.client_secret",
            "required for grant client_credentials",
        ),
        (
            "",
            "{type: oauth2, token_url: http://t/x, client_id: c, client_secret: env:S}",
            5,
            "providers.p.auth.token_url",
            "must be https",
        ),
        (
            "",
            "{type: oauth2, token_url: https://t/x, client_id: c, client_secret: s3cr3t-LITERAL}",
            5,
            "providers.p.auth.client_secret",
            "literal secrets are not allowed",
        ),
        (
            "",
            "{type: oauth2, grant: refresh_token, token_url: https://t/x, client_id: c}",
            5,
            "providers.p.auth.refresh_token",
            "required for grant refresh_token",
        ),
    ],
)
def test_problems_name_line_and_field_never_the_value(
    stores: str, auth: str, line: int, field: str, words: str
) -> None:
    found = problems(PROVIDER.format(stores=stores, auth=auth))
    assert any(ln == line and f == field and words in m for ln, f, m in found), found
    for _ln, _f, message in found:
        assert "LITERAL" not in message
