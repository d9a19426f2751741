"""Where entries live: this process's memory (LRU bounded by bytes) or Redis.

Why not aiocache (declared by the design; 0.12.3 is locked): its memory
backend is a dict with a ``call_later`` timer per key and no bound by bytes
or LRU, so ``max_bytes`` could not be kept; its ``RedisCache`` builds its own
connection pool from host/port/password instead of taking the policy's
``redis:`` client, and offers key/value operations only (``multi_set`` is
MSET), so an entry and its sorted-set index cannot share a MULTI/EXEC; its
JSON serializer cannot carry raw bytes and its pickle serializer would run code written by anyone who can write to the
shared Redis. Entries here are framed as a JSON head plus the raw body
bytes, never unpickled (docs/cache.md, "Why not aiocache").
"""

from __future__ import annotations

import fnmatch
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from redis.asyncio import Redis

# What an entry costs beyond its bytes (the Entry object, its dict slot, the
# header tuples): measured with tracemalloc on 10,000 entries, rounded up.
ENTRY_OVERHEAD = 640


@dataclass(frozen=True, slots=True)
class Entry:
    provider: str
    path: str  # without the query: what DELETE /cache?pattern= matches
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes
    stored_at: float  # wall clock seconds
    ttl: float
    stale: float  # seconds after ttl it may still serve when the upstream fails
    saved_usd: float = 0.0  # what a hit saves: the cost of the answer it replays
    tokens: int = 0

    @property
    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + len(self.path) + ENTRY_OVERHEAD

    def age(self, now: float) -> float:
        return max(0.0, now - self.stored_at)

    def fresh(self, now: float) -> bool:
        return now - self.stored_at < self.ttl

    def usable_stale(self, now: float) -> bool:
        return now - self.stored_at < self.ttl + self.stale

    def encode(self) -> bytes:
        head = {"provider": self.provider, "path": self.path, "status": self.status, "headers": self.headers,
                "stored_at": self.stored_at, "ttl": self.ttl, "stale": self.stale, "saved_usd": self.saved_usd,
                "tokens": self.tokens}  # fmt: skip
        return json.dumps(head, separators=(",", ":")).encode() + b"\n" + self.body

    @classmethod
    def decode(cls, data: bytes) -> Entry | None:
        """None for anything not written by ``encode`` (a foreign or damaged value)."""
        head_bytes, sep, body = data.partition(b"\n")
        try:
            head: dict[str, Any] = json.loads(head_bytes) if sep else {}
            headers = tuple((str(k), str(v)) for k, v in head["headers"])
            return cls(str(head["provider"]), str(head["path"]), int(head["status"]), headers, body,
                       float(head["stored_at"]), float(head["ttl"]), float(head["stale"]), float(head["saved_usd"]),
                       int(head["tokens"]))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None


class MemoryStore:
    """LRU by bytes: a put past ``max_bytes`` evicts the least recently used."""

    def __init__(self, max_bytes: int, *, clock: Any = time.time) -> None:
        self.max_bytes = max_bytes
        self.clock = clock
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.bytes = 0
        self.evictions = 0

    def get(self, key: str) -> Entry | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        if not entry.usable_stale(self.clock()):
            self._drop(key)
            return None
        self.entries.move_to_end(key)
        return entry

    def put(self, key: str, entry: Entry) -> None:
        size = entry.size
        if size > self.max_bytes:
            return
        if key in self.entries:
            self._drop(key)
        while self.entries and self.bytes + size > self.max_bytes:
            self._drop(next(iter(self.entries)))
            self.evictions += 1
        self.entries[key] = entry
        self.bytes += size

    def delete(self, provider: str | None, pattern: str) -> int:
        doomed = [k for k, e in self.entries.items()
                  if (provider is None or e.provider == provider) and fnmatch.fnmatchcase(e.path, pattern)]  # fmt: skip
        for key in doomed:
            self._drop(key)
        return len(doomed)

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        self.bytes -= entry.size

    def statistics(self) -> dict[str, int]:
        return {"entries": len(self.entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                "evictions": self.evictions}  # fmt: skip

    def __repr__(self) -> str:
        return f"MemoryStore({len(self.entries)} entries, {self.bytes}/{self.max_bytes} bytes)"


class RedisStore:
    """Entries as TTL'd string keys, one sorted-set index per provider
    (member ``digest path``, score the expiry) for DELETE by pattern without
    ``KEYS``. The ``{sidekey-cache:PROVIDER}`` hash tag keeps a provider's
    entries and index in one Redis Cluster slot, so the write is one
    MULTI/EXEC."""

    PREFIX = "sidekey:cache"

    def __init__(self, client: Redis, *, timeout: float = 0.5, clock: Any = time.time) -> None:
        self.client = client
        self.timeout = timeout
        self.clock = clock
        self.errors = 0
        self.evictions = 0

    def _tag(self, provider: str) -> str:
        return f"{self.PREFIX}:{{sidekey-cache:{provider}}}"

    def entry_key(self, provider: str, key: str) -> str:
        return f"{self._tag(provider)}:e:{key}"

    def lock_key(self, provider: str, key: str) -> str:
        """The leader lock of ``coalesce: cluster`` (``addons.cache.cluster``): the entry's slot."""
        return f"{self._tag(provider)}:l:{key}"

    def index_key(self, provider: str) -> str:
        return f"{self._tag(provider)}:index"

    async def hmac_key(self, fresh: bytes) -> bytes:
        """The identity key every sidecar of this Redis shares: the first one's."""
        name = f"{self.PREFIX}:identity-key"
        await self.client.set(name, fresh, nx=True)
        found = await self.client.get(name)
        return found.encode() if isinstance(found, str) else (found or fresh)

    async def get(self, provider: str, key: str) -> Entry | None:
        data = await self.client.get(self.entry_key(provider, key))
        return Entry.decode(data.encode() if isinstance(data, str) else data) if data else None

    async def put(self, key: str, entry: Entry) -> None:
        expires = entry.stored_at + entry.ttl + entry.stale
        ms = max(1, int((entry.ttl + entry.stale) * 1000))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.set(self.entry_key(entry.provider, key), entry.encode(), px=ms)
            pipe.zadd(self.index_key(entry.provider), {f"{key} {entry.path}": expires})
            pipe.zremrangebyscore(self.index_key(entry.provider), "-inf", self.clock())
            await pipe.execute()

    async def delete(self, providers: list[str], pattern: str) -> int:
        removed = 0
        for provider in providers:
            index = self.index_key(provider)
            doomed: list[str] = []
            async for member, _score in self.client.zscan_iter(index):
                text = member.decode() if isinstance(member, bytes) else str(member)
                key, _, path = text.partition(" ")
                if fnmatch.fnmatchcase(path, pattern):
                    doomed.append(text)
            for start in range(0, len(doomed), 500):
                batch = doomed[start : start + 500]
                async with self.client.pipeline(transaction=True) as pipe:
                    pipe.delete(*(self.entry_key(provider, m.partition(" ")[0]) for m in batch))
                    pipe.zrem(index, *batch)
                    result = await pipe.execute()
                removed += int(result[0])
        return removed

    async def count(self, provider: str) -> int:
        await self.client.zremrangebyscore(self.index_key(provider), "-inf", self.clock())
        return int(await self.client.zcard(self.index_key(provider)))

    def __repr__(self) -> str:
        return f"RedisStore(errors={self.errors})"
