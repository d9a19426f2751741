"""Requests over a limit waiting their turn: one queue per provider, higher
priority first (``x-sidekey-priority``), then arrival. Only the queue's head
asks the limiter again, after the wait the last verdict named (or when a
concurrency slot is handed back, or every ``CONCURRENT_POLL`` for a shared
slot that frees at no known time); the others wait for the head to leave.
A request waits at most its provider's ``queue_wait``.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from addons.limits.checks import by_concurrency

if TYPE_CHECKING:
    from addons.limits.arithmetic import LocalLimiter, Verdict
    from addons.limits.redis_limiter import RedisLimiter
    from proxy.policy import Provider

    Acquired = tuple[Verdict, LocalLimiter | RedisLimiter]

CONCURRENT_POLL = 0.05  # seconds between tries when waiting for a shared (Redis) concurrency slot


@dataclass(order=True, slots=True)
class _Waiter:
    priority: int
    seq: int
    ready: asyncio.Event = field(compare=False)


class PriorityQueues:
    def __init__(self, clock: Callable[[], float], freed: asyncio.Event) -> None:
        self.clock = clock
        self.freed = freed  # set when a concurrency slot is returned: the head tries again
        self._queues: dict[str, list[_Waiter]] = {}
        self._seq = itertools.count()

    async def wait(
        self, provider: Provider, priority: int, first: Acquired, acquire: Callable[[], Awaitable[Acquired]]
    ) -> Acquired:
        """Wait in ``provider``'s queue, from a refusal just given (``first``), until
        ``acquire`` allows or ``queue_wait`` runs out; the last verdict."""
        verdict, limiter = first
        deadline = self.clock() + provider.queue_wait
        queue = self._queues.setdefault(provider.name, [])
        me = _Waiter(priority, next(self._seq), asyncio.Event())
        heapq.heappush(queue, me)
        fresh = True  # ``verdict`` is current: the head pauses before asking again
        try:
            while True:
                if queue[0] is not me:  # someone ahead (higher priority or earlier): wait for them
                    me.ready.clear()
                    await _wait(me.ready, deadline - self.clock())
                    fresh = False
                else:
                    if not fresh:
                        verdict, limiter = await acquire()
                        if verdict.allowed:
                            return verdict, limiter
                    fresh = False
                    pause = min(verdict.retry_after, deadline - self.clock())
                    if by_concurrency(verdict):  # a slot frees at no known time: woken, or poll
                        pause = min(pause, CONCURRENT_POLL)
                    self.freed.clear()
                    await _wait(self.freed, pause)
                left = deadline - self.clock()
                if left <= 0 or (verdict.retry_after > left and not by_concurrency(verdict)):
                    return verdict, limiter
        finally:
            queue.remove(me)
            heapq.heapify(queue)
            if queue:
                queue[0].ready.set()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    if seconds <= 0:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()
