"""Policy readers for how a provider's upstream connections are made:
``timeouts:``, ``tls:`` and ``pool:``. Split from ``proxy.policy.load`` (same
conventions: every problem names file, line and field; values are never echoed).

    providers:
      internal:
        timeouts: {connect: 5s, read: 10m}
        tls: {ca_bundle: /etc/ssl/internal-ca.pem, server_name: api.internal}
        pool: {max_connections: 100, keepalive_timeout: 30s}
"""

from __future__ import annotations

import yaml

from proxy.policy.fields import Reader
from proxy.policy.model import PoolLimits, Timeouts, UpstreamTLS


def timeouts(r: Reader, node: yaml.Node, field: str) -> Timeouts:
    d = Timeouts()
    f = r.mapping(node, field, frozenset({"connect", "read"}))
    return Timeouts(
        connect=r.opt(f, field, "connect", r.duration, d.connect),
        read=r.opt(f, field, "read", r.duration, d.read),
    )


def tls(r: Reader, node: yaml.Node, field: str) -> UpstreamTLS:
    f = r.mapping(node, field, frozenset({"ca_bundle", "server_name"}))
    return UpstreamTLS(
        ca_bundle=r.opt(f, field, "ca_bundle", r.ca_bundle, None, null_ok=True),
        server_name=r.opt(f, field, "server_name", r.host, None, null_ok=True),
    )


def pool(r: Reader, node: yaml.Node, field: str) -> PoolLimits:
    d = PoolLimits()
    f = r.mapping(node, field, frozenset({"max_connections", "keepalive_timeout"}))
    return PoolLimits(
        max_connections=r.opt(f, field, "max_connections", r.count, d.max_connections),
        keepalive_timeout=r.opt(f, field, "keepalive_timeout", r.duration, d.keepalive_timeout),
    )
