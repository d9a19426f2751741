"""Rate, token and concurrency limits per provider, per caller and per
upstream key, local or shared between sidecars through Redis.

``request``: the provider's and the caller's rules are taken all-or-nothing
(``proxy.ratelimit`` arithmetic; one Redis script call when the policy has
``redis``). Token rules reserve the request's estimate (prompt + its output
cap). Over a limit, the request waits in a priority queue up to the
provider's ``queue_wait`` (``x-sidekey-priority: high|normal|low``, higher
first, then arrival), then gets 429 ``rate_limited`` with ``Retry-After``:
distinct from an upstream 429, which keeps the provider's own body.
Allowed answers carry ``x-ratelimit-limit-<rule>``, ``-remaining-`` and
``-reset-`` for each rule.

Per-key rules (``upstreams[].limits``) are taken by the forwarder through
``admit_member`` when it picks a member: a key over its quota rests and the
next key is tried, so a pool spreads load by quota.

``response`` / ``error``: token reservations are reconciled with the usage
the usage addon measured (``flow.metadata["usage"]``), and concurrency slots
are returned. Redis leases of long streams are refreshed in the background.

Redis down: ``on_failure: open`` falls back to this process's own limiter
(logged once per outage, counted); ``closed`` answers 503
``limits_unavailable``. The client reconnects on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from proxy import errors
from proxy.errors import LimitsUnavailable, RateLimited
from proxy.flow import Flow, Response
from proxy.policy import Policy, Provider
from proxy.ratelimit import Check, LocalLimiter, Rule, Verdict
from proxy.redis_limits import LimiterUnavailable, RedisLimiter

if TYPE_CHECKING:
    from proxy.balance import UpstreamState
    from proxy.engine import Sidekey

log = logging.getLogger("sidekey.limits")

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
DEFAULT_OUTPUT = 4096  # tokens reserved for the answer when the request names no cap
# max_tokens (both wires), max_completion_tokens (OpenAI chat), max_output_tokens (Responses)
_OUTPUT_CAP = re.compile(rb'"max(?:_completion|_output)?_tokens"\s*:\s*(\d{1,9})')
CONCURRENT_POLL = 0.05  # seconds between tries when waiting for a shared (Redis) concurrency slot
SETTLE_LINGER = 0.02  # seconds a finished request's release may wait for an acquire to carry it
LEASE_TTL = 60.0  # seconds a Redis concurrency lease lives unless refreshed
REFRESH_EVERY = 20.0


@dataclass(slots=True)
class Taken:
    """What one flow holds: released or reconciled when it ends."""

    checks: Sequence[Check]
    tokens: int
    limiter: LocalLimiter | RedisLimiter
    lease: str | None = None
    states: tuple[Any, ...] = ()


@dataclass(order=True, slots=True)
class _Waiter:
    priority: int
    seq: int
    ready: asyncio.Event = field(compare=False)


class Limits:
    name = "limits"

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.local = LocalLimiter()
        self.shared: RedisLimiter | None = None
        self.on_failure = "open"
        self.engine: Sidekey | None = None
        self.redis_down = False
        self.counters = {"allowed": 0, "queued": 0, "refused": 0, "redis_fallbacks": 0, "unavailable": 0}
        self._queues: dict[str, list[_Waiter]] = {}
        self._seq = itertools.count()
        self._leases: dict[str, Taken] = {}
        self._pending: list[tuple[Sequence[Check], str | None, int]] = []
        self._wake = asyncio.Event()
        self._freed = asyncio.Event()  # a concurrency slot was returned: the queue's head tries again
        # (provider, caller) -> its (scope, rule) pairs and whether one is a token rule
        self._check_cache: dict[tuple[str, str], tuple[Sequence[Check], bool]] = {}
        self._header_names: dict[str, tuple[str, str, str]] = {}
        self._tasks: list[asyncio.Task[None]] = []

    def bind(self, engine: Sidekey) -> None:
        self.engine = engine

    def configure(self, policy: Policy) -> None:
        self._check_cache = {}  # rules may have changed
        redis = self.engine.redis if self.engine is not None else None
        if redis is None:
            self.shared = None
        elif self.shared is None or self.shared.client is not redis:
            timeout = policy.redis.timeout if policy.redis else 0.5
            self.shared = RedisLimiter(redis, lease_ttl=LEASE_TTL, timeout=timeout)
        self.on_failure = policy.redis.on_failure if policy.redis else "open"

    def running(self) -> None:
        self._tasks = [
            asyncio.create_task(self._refresh_leases(), name="sidekey-limit-leases"),
            asyncio.create_task(self._settle_loop(), name="sidekey-limit-settle"),
        ]

    async def done(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._pending and self.shared is not None:  # hand back what finished last
            with contextlib.suppress(LimiterUnavailable):
                await self.shared.release_many(self._pending)

    # -- provider and caller limits -------------------------------------------------
    def request(self, flow: Flow) -> Awaitable[None] | None:
        provider = flow.provider
        if provider is None or not (provider.limits or provider.caller_limits):
            return None  # the common case: nothing to count, and no coroutine made for it
        checks, has_tokens = self._checks_for(provider, flow.caller)
        tokens = self._tokens(flow) if has_tokens else 0
        priority = flow.request.headers.pop("x-sidekey-priority", None)
        if self.shared is None:  # local limits: decided here, a coroutine only when it must wait
            verdict = self.local.acquire(checks, tokens, self.clock())
            if verdict.allowed:
                self.counters["allowed"] += 1
                flow.metadata["limits"] = Taken(checks, tokens, self.local, None, verdict.states)
                return None
        rank = PRIORITIES.get(priority.strip().lower(), 1) if priority else 1
        return self._limit(flow, provider, checks, tokens, rank)

    def _checks_for(self, provider: Provider, caller: str) -> tuple[Sequence[Check], bool]:
        """The (scope, rule) pairs of a request, built once per provider and caller."""
        key = (provider.name, caller if provider.caller_limits else "")
        found = self._check_cache.get(key)
        if found is None:
            built = [(f"provider:{provider.name}", r) for r in provider.limits]
            built += [(f"caller:{provider.name}/{caller}", r) for r in provider.caller_limits]
            if len(self._check_cache) >= 4096:  # callers come from requests: bounded
                self._check_cache.clear()
            found = self._check_cache[key] = (tuple(built), any(r.kind == "tokens" for _, r in built))
        return found

    async def _limit(self, flow: Flow, provider: Provider, checks: Sequence[Check], tokens: int, rank: int) -> None:
        try:
            taken = await self._take(provider, checks, tokens, rank)
        except errors.ProxyError as err:
            flow.response = Response.from_error(err)
            if isinstance(err, RateLimited):
                flow.response.headers["retry-after"] = str(err.fields["seconds"])
            return
        flow.metadata["limits"] = taken

    def responseheaders(self, flow: Flow) -> None:
        taken = flow.metadata.get("limits") if flow.metadata else None
        if taken is None or flow.response is None:
            return
        headers = flow.response.headers
        names = self._header_names
        for state in taken.states:  # ours, per rule; the provider's own x-ratelimit-* pass untouched
            limit, remaining, reset = names.get(state.name) or self._names_for(state.name)
            headers[limit] = str(state.limit)
            headers[remaining] = str(state.remaining)
            headers[reset] = f"{math.ceil(state.reset)}s"

    def _names_for(self, rule: str) -> tuple[str, str, str]:
        names = self._header_names[rule] = _header_names(rule)
        return names

    def response(self, flow: Flow) -> None:
        self._settle(flow)

    def error(self, flow: Flow) -> None:
        self._settle(flow)

    # -- per-key limits (called by the forwarder) -------------------------------------
    async def admit_member(self, flow: Flow, provider: Provider, state: UpstreamState) -> float:
        """Take the member's own rules; 0 when admitted, else seconds until it could be."""
        checks = [(f"upstream:{provider.name}/{state.name}", r) for r in state.target.limits]
        tokens = self._tokens(flow) if any(r.kind == "tokens" for r in state.target.limits) else 0
        try:
            verdict, limiter = await self._acquire(checks, tokens)
        except LimitsUnavailable:
            return 1.0
        if not verdict.allowed:
            return max(verdict.retry_after, 0.001)
        flow.metadata.setdefault("member_limits", []).append(self._held(Taken(checks, tokens, limiter, verdict.lease)))
        return 0.0

    # -- internals ------------------------------------------------------------------
    def _tokens(self, flow: Flow) -> int:
        """Tokens to reserve: the prompt at ~4 bytes per token (the body's
        length: JSON's punctuation makes it an over-estimate, corrected at
        reconcile) plus the output cap the request names. A regex, not a JSON
        parse: this runs on every request of a provider with token limits."""
        reserved = flow.metadata.get("reserve")
        if reserved is None:
            reserved = flow.metadata["reserve"] = reservation(flow.request.body, flow.request.content_length)
        return int(reserved)

    async def _take(self, provider: Provider, checks: Sequence[Check], tokens: int, priority: int) -> Taken:
        """Acquire, waiting in the provider's priority queue up to ``queue_wait``."""
        verdict, limiter = await self._acquire(checks, tokens)
        if verdict.allowed:
            self.counters["allowed"] += 1
            return self._held(Taken(checks, tokens, limiter, verdict.lease, verdict.states))
        deadline = self.clock() + provider.queue_wait
        if provider.queue_wait > 0 and (verdict.retry_after <= provider.queue_wait or _by_concurrency(verdict)):
            self.counters["queued"] += 1
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
                            verdict, limiter = await self._acquire(checks, tokens)
                            if verdict.allowed:
                                self.counters["allowed"] += 1
                                return self._held(Taken(checks, tokens, limiter, verdict.lease, verdict.states))
                        fresh = False
                        pause = min(verdict.retry_after, deadline - self.clock())
                        if _by_concurrency(verdict):  # a slot frees at no known time: woken, or poll
                            pause = min(pause, CONCURRENT_POLL)
                        self._freed.clear()
                        await _wait(self._freed, pause)
                    left = deadline - self.clock()
                    if left <= 0 or (verdict.retry_after > left and not _by_concurrency(verdict)):
                        break
            finally:
                queue.remove(me)
                heapq.heapify(queue)
                if queue:
                    queue[0].ready.set()
        self.counters["refused"] += 1
        scope = (verdict.refused_by or "provider").split(":", 1)[0]
        seconds = 1 if math.isinf(verdict.retry_after) else max(1, math.ceil(verdict.retry_after))
        raise RateLimited(provider.name, scope=scope, seconds=seconds)

    def _held(self, taken: Taken) -> Taken:
        if taken.lease is not None:  # a Redis lease: refreshed while the flow lives
            self._leases[taken.lease] = taken
        return taken

    async def _acquire(self, checks: Sequence[Check], tokens: int) -> tuple[Verdict, LocalLimiter | RedisLimiter]:
        shared = self.shared
        if shared is not None:
            settles, self._pending = self._pending, []  # ride along: no round trip of their own
            try:
                verdict = await shared.acquire(checks, tokens, settles=settles)
            except LimiterUnavailable:
                self._pending[:0] = settles  # try them again later (leases expire meanwhile anyway)
                if not self.redis_down:
                    log.error("redis unreachable: limits %s", "fall back to this process" if self.on_failure == "open"
                              else "refuse requests (on_failure: closed)")  # fmt: skip
                self.redis_down = True
                if self.on_failure == "closed":
                    self.counters["unavailable"] += 1
                    raise LimitsUnavailable() from None
                self.counters["redis_fallbacks"] += 1
            else:
                if self.redis_down:
                    log.warning("redis reachable again: limits are shared")
                    self.redis_down = False
                return verdict, shared
        return self.local.acquire(checks, tokens, self.clock()), self.local

    def _settle(self, flow: Flow) -> None:
        meta = flow.metadata
        if not meta:
            return
        taken = meta.pop("limits", None)
        members = meta.pop("member_limits", None) if "member_limits" in meta else None
        if taken is None and not members:
            return
        measured = meta.get("usage")
        for held in (taken, *members) if members else (taken,):
            if held is not None:
                self._release(held, measured.total - held.tokens if measured is not None and held.tokens else 0)

    def _release(self, taken: Taken, delta: int) -> None:
        limiter = taken.limiter
        if isinstance(limiter, RedisLimiter):
            self._leases.pop(taken.lease or "", None)
            if taken.lease is not None or delta:  # batched: one pipeline for many requests
                self._pending.append((taken.checks, taken.lease, delta))
                self._wake.set()
            return
        if delta:
            limiter.reconcile(taken.checks, delta, self.clock())
        limiter.release(taken.checks)
        self._freed.set()

    async def _settle_loop(self) -> None:
        """Sends finished requests' releases and reconciles to Redis in one
        pipeline per batch, so the request path pays one round trip (its acquire)."""
        while True:
            await self._wake.wait()
            # Under traffic the next acquire carries them; flush alone only when it is quiet.
            await asyncio.sleep(SETTLE_LINGER)
            self._wake.clear()
            batch, self._pending = self._pending, []
            shared = self.shared
            if shared is None or not batch:
                continue
            # Redis down: leases expire on their own; a missed reconcile is at most one window's error.
            with contextlib.suppress(LimiterUnavailable):
                await shared.release_many(batch)
            self._freed.set()

    async def _refresh_leases(self) -> None:
        while True:
            await asyncio.sleep(REFRESH_EVERY)
            for taken in list(self._leases.values()):
                if isinstance(taken.limiter, RedisLimiter) and taken.lease:
                    with contextlib.suppress(LimiterUnavailable):
                        await taken.limiter.refresh(taken.checks, taken.lease)

    def statistics(self) -> dict[str, Any]:
        return {**self.counters, "shared": self.shared is not None and not self.redis_down,
                "local": self.local.statistics()}  # fmt: skip

    def __repr__(self) -> str:
        return f"Limits(shared={self.shared is not None}, {self.counters})"


async def _wait(event: asyncio.Event, seconds: float) -> None:
    if seconds <= 0:
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await event.wait()


def _by_concurrency(verdict: Verdict) -> bool:
    return (verdict.refused_by or "").endswith(" concurrent")


def reservation(body: object, length: int | None) -> int:
    """Tokens reserved for a request before it is sent (see ``Limits._tokens``)."""
    if not isinstance(body, bytes):  # streamed: only its length is known
        return (length or 0) // 4 + DEFAULT_OUTPUT
    cap = _OUTPUT_CAP.search(body)
    return len(body) // 4 + (int(cap.group(1)) if cap else DEFAULT_OUTPUT)


def _header_names(rule: str) -> tuple[str, str, str]:
    return f"x-ratelimit-limit-{rule}", f"x-ratelimit-remaining-{rule}", f"x-ratelimit-reset-{rule}"


__all__ = ["Limits", "LimitsUnavailable", "RateLimited", "Rule"]
