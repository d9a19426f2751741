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
    return r.record(node, field, Timeouts, {"connect": r.duration, "read": r.duration})


def tls(r: Reader, node: yaml.Node, field: str) -> UpstreamTLS:
    return r.record(node, field, UpstreamTLS, {"ca_bundle": r.ca_bundle, "server_name": r.host}, null_ok=True)


def pool(r: Reader, node: yaml.Node, field: str) -> PoolLimits:
    return r.record(node, field, PoolLimits, {"max_connections": r.count, "keepalive_timeout": r.duration})
