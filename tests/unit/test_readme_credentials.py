"""Every example in README's "Credential sources and auth types" is a whole
policy that loads, and together they cover every source and auth type."""

from __future__ import annotations

import re
from pathlib import Path

from proxy.policy import Policy
from proxy.policy.load import parse_policy

README = Path(__file__).resolve().parents[2] / "README.md"


def examples() -> list[str]:
    text = README.read_text()
    section = text.split("### Credential sources and auth types", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```yaml\n(.*?)```", section, re.S)


def test_each_example_loads_and_every_source_and_auth_type_is_shown() -> None:
    policies: list[Policy] = [parse_policy(text) for text in examples()]
    auth = {p.auth.type for policy in policies for p in policy.providers}
    kinds = {p.auth.secret.kind for policy in policies for p in policy.providers if p.auth.secret is not None}
    vault_methods = {policy.secret_stores.vault.auth.method for policy in policies if policy.secret_stores.vault}
    grants = {p.auth.oauth2.grant for policy in policies for p in policy.providers if p.auth.oauth2 is not None}
    assert auth == {"bearer", "header", "basic", "query", "oauth2", "aws-sigv4", "none"}
    assert kinds == {"env", "file", "vault", "aws-sm", "azure-kv", "oauth2"}
    assert vault_methods == {"token", "approle", "kubernetes"}
    assert grants == {"client_credentials", "refresh_token"}
    assert any(p.placeholders for policy in policies for p in policy.providers)
