"""Which upstream pools a reloaded policy can still use (``proxy.upstream.reachable``):
the rest are retired, and closed once their requests finish."""

from __future__ import annotations

import ipaddress

import pytest

from proxy.netguard import Guard
from proxy.policy.load import parse_policy
from proxy.upstream import PoolKey, pool_key, reachable

BASE = """\
version: 1
providers:
  fixed:
    hosts: [fixed.test]
    upstream: https://upstream.test:8443
    auth: {type: bearer, secret: env:K}
  follows:
    hosts: ["*.follows.test"]
    auth: {type: bearer, secret: env:K}
"""
GUARD = Guard()


def key(policy_text: str, provider: str, host: str, port: int, guard: Guard = GUARD) -> PoolKey:
    policy = parse_policy(policy_text)
    return pool_key(next(p for p in policy.providers if p.name == provider), "https", host, port, guard)


CASES = [
    ("unchanged provider keeps its pool", key(BASE, "fixed", "upstream.test", 8443), BASE, GUARD, True),
    ("upstream moved", key(BASE, "fixed", "upstream.test", 8443),
     BASE.replace("upstream.test:8443", "upstream.test:9443"), GUARD, False),
    ("pool setting changed", key(BASE, "fixed", "upstream.test", 8443),
     BASE.replace("    auth: {type: bearer, secret: env:K}\n", "    auth: {type: bearer, secret: env:K}\n"
                  "    pool: {max_connections: 7}\n", 1), GUARD, False),
    ("provider removed", key(BASE, "fixed", "upstream.test", 8443),
     "version: 1\nproviders:\n  follows:" + BASE.split("  follows:")[1], GUARD, False),
    ("another provider with the same upstream and settings", key(BASE, "fixed", "upstream.test", 8443),
     BASE.replace("fixed", "other"), GUARD, True),
    ("CONNECT-target member: a host it matches", key(BASE, "follows", "a.follows.test", 443), BASE, GUARD, True),
    ("CONNECT-target member: a host it no longer matches", key(BASE, "follows", "a.follows.test", 443),
     BASE.replace("*.follows.test", "*.elsewhere.test"), GUARD, False),
    ("address allow-list changed", key(BASE, "fixed", "upstream.test", 8443), BASE,
     Guard((ipaddress.ip_network("169.254.169.254/32"),)), False),
    ("unmatched passthrough", pool_key(None, "http", "plain.test", 80, GUARD), BASE, GUARD, True),
]  # fmt: skip


@pytest.mark.parametrize(("name", "pool", "policy_text", "guard", "expected"), CASES, ids=[c[0] for c in CASES])
def test_a_pool_is_kept_only_while_the_policy_can_use_it(
    name: str, pool: PoolKey, policy_text: str, guard: Guard, expected: bool
) -> None:
    assert reachable(pool, parse_policy(policy_text), guard) is expected
