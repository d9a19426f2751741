"""Where each cache-enabled provider's entries live: its own memory LRU
(``max_bytes`` each) or the Redis the policy's ``redis:`` section names.

Redis failures never fail a request: a read that fails or times out is a
miss, a write that fails is a later miss; both are counted in ``errors``.
Writes go in the background (kept tasks, awaited at shutdown), so a miss's
caller never waits for Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from addons.cache.cluster import ClusterLocks
from addons.cache.stores import Entry, MemoryStore, RedisStore
from proxy.policy import CachePolicy, Policy

if TYPE_CHECKING:
    from redis.asyncio import Redis

log = logging.getLogger("sidekey.cache")


class Backends:
    __slots__ = ("memory", "redis", "locks", "clock", "_writes")

    def __init__(self, *, clock: Any = time.time) -> None:
        self.clock = clock
        self.memory: dict[str, MemoryStore] = {}  # per provider, each with its own max_bytes
        self.redis: RedisStore | None = None
        self.locks: ClusterLocks | None = None  # coalesce: cluster
        self._writes: set[asyncio.Task[None]] = set()

    def configure(self, policy: Policy, client: Redis | None) -> None:
        """Keep the stores (and their entries) of providers still cached in memory; a
        changed ``max_bytes`` applies from the next put."""
        kept: dict[str, MemoryStore] = {}
        for p in policy.providers:
            c = p.cache
            if c is None or c.backend != "memory":
                continue
            store = self.memory.get(p.name) or MemoryStore(c.max_bytes, clock=self.clock)
            store.max_bytes = c.max_bytes
            kept[p.name] = store
        self.memory = kept
        wants_redis = any(p.cache is not None and p.cache.backend == "redis" for p in policy.providers)
        if client is None or not wants_redis:
            self.redis = self.locks = None
        elif self.redis is None or self.redis.client is not client:
            timeout = policy.redis.timeout if policy.redis is not None else 0.5
            self.redis = RedisStore(client, timeout=timeout, clock=self.clock)
            self.locks = ClusterLocks(self.redis)

    def shared(self, policy: CachePolicy) -> RedisStore | None:
        return self.redis if policy.backend == "redis" else None

    def local(self, provider: str, key: str) -> Entry | None:
        """The memory backend's entry (None for a Redis provider: read with ``fetch``)."""
        store = self.memory.get(provider)
        return store.get(key) if store is not None else None

    async def fetch(self, provider: str, key: str) -> Entry | None:
        redis = self.redis
        assert redis is not None
        try:
            async with asyncio.timeout(redis.timeout):
                return await redis.get(provider, key)
        except Exception as exc:  # noqa: BLE001 - a down Redis is a miss, never a failed request
            redis.errors += 1
            log.debug("cache: redis read failed (%s)", type(exc).__name__)
            return None

    def put(self, key: str, entry: Entry, policy: CachePolicy) -> asyncio.Task[None] | None:
        """Store ``entry``; a Redis write goes in the background (the task, to wait on)."""
        if policy.backend == "memory":
            store = self.memory.get(entry.provider)
            if store is not None:
                store.put(key, entry)
            return None
        if self.redis is None:
            return None
        task = asyncio.create_task(self._redis_put(key, entry), name="sidekey-cache-write")
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        return task

    async def _redis_put(self, key: str, entry: Entry) -> None:
        assert self.redis is not None
        try:
            async with asyncio.timeout(self.redis.timeout * 4):
                await self.redis.put(key, entry)
        except Exception as exc:  # noqa: BLE001 - an entry not written is a later miss
            self.redis.errors += 1
            log.debug("cache: redis write failed (%s)", type(exc).__name__)

    async def drain(self) -> None:
        """Wait for the background writes (shutdown)."""
        for task in list(self._writes):
            with contextlib.suppress(Exception):
                await task
        if self.locks is not None:
            await self.locks.drain()

    async def delete(self, provider: str | None, pattern: str, redis_providers: list[str]) -> int:
        removed = 0
        for name, store in self.memory.items():
            if provider is None or provider == name:
                removed += store.delete(None, pattern)
        if self.redis is not None and redis_providers:
            removed += await self.redis.delete(redis_providers, pattern)
        return removed

    async def view(self, provider: str) -> dict[str, Any]:
        """Entries and bytes of one provider (bytes: None in Redis, which does not say cheaply)."""
        store = self.memory.get(provider)
        if store is not None:
            return store.statistics()
        if self.redis is None:
            return {"entries": 0, "bytes": None}
        try:
            return {"entries": await self.redis.count(provider), "bytes": None}
        except Exception:  # noqa: BLE001 - stats still answer without Redis
            return {"entries": None, "bytes": None}

    def statistics(self) -> dict[str, Any]:
        return {"stores": {k: v.statistics() for k, v in self.memory.items()}, "writing": len(self._writes),
                "redis": repr(self.redis) if self.redis is not None else None,
                "cluster": self.locks.statistics() if self.locks is not None else None}  # fmt: skip

    def __repr__(self) -> str:
        redis = self.redis is not None
        return f"Backends({len(self.memory)} memory stores, redis={redis}, {len(self._writes)} writing)"
