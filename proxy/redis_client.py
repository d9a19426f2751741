"""The Redis client factory: state the limits and usage addons share between
sidecars. One client per engine, made from the policy's ``redis``
section and remade only when its URL or timeout changes on reload.

The URL may carry a password, so it is never logged or shown; only its
source (``env:REDIS_URL``) or the words "the policy's redis.url" are.
"""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff


def connect(url: str, timeout: float, max_connections: int = 64) -> Redis:
    """A bounded pool (callers wait for a connection up to ``timeout``),
    connect and read timeouts, and no retries: a retried limit script could
    count a request twice. Connecting is lazy; a down Redis shows on first use
    and the pool reconnects on its own when it is back."""
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=timeout,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),
    )
    return Redis.from_pool(pool)
