"""Policy reader for a provider's ``placeholders:``. Split from
``proxy.policy.load`` (same conventions: every problem names file, line and
field; values are never echoed).

    providers:
      slack:
        hosts: [hooks.slack.com]
        auth: {type: none}
        placeholders:
          SIDEKEY_SLACK_WEBHOOK_TOKEN: "vault:secret/data/slack#webhook"
          SIDEKEY_SLACK_SIGNING_KEY: env:SLACK_SIGNING_KEY

A name must match ``proxy.placeholders.NAME`` (so it never matches ordinary
text) and belong to one provider only (so a request carrying it has exactly
one place it may go). A value is any credential source (env:, file:, vault:,
aws-sm:, azure-kv:).
"""

from __future__ import annotations

import yaml

from proxy.placeholders import NAME, NAME_RULE
from proxy.policy.credentials import credential
from proxy.policy.fields import Invalid, Reader, join, line_of
from proxy.policy.model import SecretRef

Seen = dict[str, tuple[str, int]]  # name -> (provider, line), across the policy
NONE: tuple[tuple[str, SecretRef], ...] = ()


def read(r: Reader, node: yaml.Node, field: str, provider: str, seen: Seen) -> tuple[tuple[str, SecretRef], ...]:
    out: list[tuple[str, SecretRef]] = []
    for name, label, key_node, value in r.entries(node, field):
        where = join(field, label)
        if not NAME.fullmatch(name):
            r.problem(key_node, where, f"expected a placeholder name: {NAME_RULE}")
            continue
        first = seen.get(name)
        if first is not None:
            r.problem(key_node, where, f"already a placeholder of provider {first[0]} (line {first[1]})")
            continue
        seen[name] = (provider, line_of(key_node))
        try:
            out.append((name, credential(r, value, where)))
        except Invalid:  # recorded by the reader
            continue
    return tuple(out)
