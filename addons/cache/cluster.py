"""Coalescing across sidecars (``coalesce: cluster``, Redis backend only).

Within one process a flight (``addons.cache.flight``) coalesces identical
requests. Across sidecars sharing a Redis, the first to miss takes a short
lock, ``SET ...:l:DIGEST TOKEN NX PX``, and leads; the others poll for the
entry the leader writes (one round trip a poll: the entry and whether the
lock is still held), with backoff from 10 ms to 250 ms, instead of going
upstream. They stop waiting when:

- the entry is there: it answers them (``x-sidekey-cache: coalesced``);
- the lock is gone and no entry came (the leader failed, or its answer may
  not be stored): one of them takes the lock and leads, the rest wait again;
- ``WAIT`` seconds passed (a leader streaming for longer, or a sidecar that
  died holding the lock, which expires after ``LOCK_TTL``): they go upstream
  themselves.

Polling rather than pub/sub: a subscriber needs a connection of its own per
waiting request or a shared listener task, and keyspace notifications are off
by default; a poll costs a waiting request one GET + EXISTS per backoff step
and nothing at all when nobody waits.

The lock lives beside the entry and the provider's index under the same
``{sidekey-cache:PROVIDER}`` hash tag: one Redis Cluster slot. It is
released only by its holder (compare-and-delete in one script), after the
entry is written, so a waiter never sees the lock gone before the entry.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

from addons.cache.stores import Entry, RedisStore

log = logging.getLogger("sidekey.cache")

LOCK_TTL = 30.0  # seconds: a leader that died holding the lock frees it after this
WAIT = 30.0  # seconds a request waits for another sidecar's leader before going upstream itself
FIRST_POLL, MAX_POLL = 0.01, 0.25

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class ClusterLocks:
    """The per-key leader locks in Redis, and waiting for another sidecar's leader."""

    __slots__ = ("store", "counters", "_release", "_tasks")

    def __init__(self, store: RedisStore) -> None:
        self.store = store
        self._release = store.client.register_script(_RELEASE)
        self._tasks: set[asyncio.Task[Any]] = set()
        self.counters = {"led": 0, "waited": 0, "answered": 0, "took_over": 0, "gave_up": 0, "errors": 0}

    async def acquire(self, provider: str, key: str) -> str | None:
        """A token when this sidecar now leads for ``key``; None when another does.
        Redis out of reach: a token too (lead; coalescing stays local)."""
        token = os.urandom(12).hex()
        try:
            async with asyncio.timeout(self.store.timeout):
                taken = await self.store.client.set(self.store.lock_key(provider, key), token, nx=True,
                                                    px=int(LOCK_TTL * 1000))  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - a down Redis: lead, as without cluster coalescing
            self.counters["errors"] += 1
            log.debug("cache: redis lock failed (%s)", type(exc).__name__)
            return token
        if taken:
            self.counters["led"] += 1
            return token
        return None

    async def wait(self, provider: str, key: str, deadline: float) -> Entry | None:
        """Until the leader's entry is there (it), the lock is gone without one or the
        deadline (loop time) passed (None: lead, or go upstream)."""
        self.counters["waited"] += 1
        loop = asyncio.get_running_loop()
        entry_key, lock_key = self.store.entry_key(provider, key), self.store.lock_key(provider, key)
        pause = FIRST_POLL
        while True:
            try:
                async with asyncio.timeout(self.store.timeout):
                    async with self.store.client.pipeline(transaction=False) as pipe:
                        pipe.get(entry_key)
                        pipe.exists(lock_key)
                        data, locked = await pipe.execute()
            except Exception as exc:  # noqa: BLE001 - a down Redis: stop waiting, go upstream
                self.counters["errors"] += 1
                log.debug("cache: redis poll failed (%s)", type(exc).__name__)
                return None
            if data:
                entry = Entry.decode(data.encode() if isinstance(data, str) else data)
                if entry is not None:
                    self.counters["answered"] += 1
                    return entry
            if not locked:
                self.counters["took_over"] += 1
                return None
            left = deadline - loop.time()
            if left <= 0:
                self.counters["gave_up"] += 1
                return None
            await asyncio.sleep(min(pause, left))
            pause = min(pause * 1.5, MAX_POLL)

    def release(self, provider: str, key: str, token: str, after: asyncio.Task[Any] | None = None) -> None:
        """Free the lock (only if still ours), after ``after`` (the entry's write) ends. In the background."""
        task = asyncio.create_task(self._free(provider, key, token, after), name="sidekey-cache-unlock")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _free(self, provider: str, key: str, token: str, after: asyncio.Task[Any] | None) -> None:
        if after is not None:
            await asyncio.wait([after])
        try:
            async with asyncio.timeout(self.store.timeout * 4):
                await self._release(keys=[self.store.lock_key(provider, key)], args=[token])
        except Exception as exc:  # noqa: BLE001 - the lock expires on its own
            self.counters["errors"] += 1
            log.debug("cache: redis unlock failed (%s)", type(exc).__name__)

    async def drain(self) -> None:
        for task in list(self._tasks):
            await asyncio.wait([task])

    def statistics(self) -> dict[str, int]:
        return {**self.counters, "releasing": len(self._tasks)}

    def __repr__(self) -> str:
        return f"ClusterLocks({self.counters})"
