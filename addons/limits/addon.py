"""Rate, token and concurrency limits per provider, per caller and per
upstream key, local or shared between sidecars through Redis.

``request``: the provider's and the caller's rules are taken all-or-nothing
(``addons.limits.arithmetic`` arithmetic; one Redis script call when the policy has
``redis``). Token rules reserve the request's estimate (prompt + its output
cap). Over a limit, the request waits in a priority queue up to the
provider's ``queue_wait`` (``x-sidekey-priority: high|normal|low``, higher
first, then arrival), then gets 429 ``rate_limited`` with ``Retry-After``:
distinct from an upstream 429, which keeps the provider's own body.
Allowed answers carry ``x-ratelimit-limit-<rule>`` and
``x-ratelimit-remaining-<rule>`` for each rule (no ``-reset-``: a refusal's
``Retry-After`` says when; two headers fewer on every request).

Per-key rules (``upstreams[].limits``) are taken in ``upstream_attempt`` when
the forwarder tries a member: a key over its quota is held off and the next
key is tried, so a pool spreads load by quota.

``response`` / ``error``: token reservations are reconciled with the usage
the usage addon measured (``flow.metadata["usage"]``), and concurrency slots
are returned. Redis leases of long streams are refreshed in the background.

Redis out of reach: a timeout while this process's event loop lags (a
starved sidekey, not a dead Redis: ``proxy.looplag``) is retried once. Then
``on_failure: open`` degrades to this process's share of each limit (the
limit divided by the sidecars seen alive in Redis in the last minute, at
least one per window: ``arithmetic.share``), so N sidecars together admit at
most the limit plus one share each; ``closed`` answers 503
``limits_unavailable``. Logged once per outage with why (timeout after N ms
with loop lag M ms, connection refused, ...), timed as ``degraded_seconds``.
The next acquire Redis answers counts shared again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from addons.limits.arithmetic import Check, LocalLimiter, Verdict
from addons.limits.checks import Checks, Taken, by_concurrency, over_limit, remaining_of
from addons.limits.degraded import Degraded
from addons.limits.queue import PriorityQueues
from addons.limits.redis_limiter import LimiterUnavailable, RedisLimiter
from addons.usage.tokens import reservation
from proxy import errors
from proxy.capabilities import CACHED_REQUESTS, SESSION_TOKENS
from proxy.errors import LimitsUnavailable, RateLimited
from proxy.flow import Flow, Response
from proxy.policy import Policy, Provider, Rule

if TYPE_CHECKING:
    from addons.usage.tokens import Usage
    from proxy.attempt import Attempt
    from proxy.balance import UpstreamState
    from proxy.runtime import Runtime

log = logging.getLogger("sidekey.limits")

PRIORITIES = {"high": 0, "normal": 1, "low": 2}
SETTLE_LINGER = 0.02  # seconds a finished request's release may wait for an acquire to carry it
LEASE_TTL = 60.0  # seconds a Redis concurrency lease lives unless refreshed
REFRESH_EVERY = 20.0


class Limits:
    name = "limits"
    provides = (SESSION_TOKENS, CACHED_REQUESTS)

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.local = LocalLimiter()
        self.shared: RedisLimiter | None = None
        self.on_failure = "open"
        self.runtime: Runtime | None = None
        self.degraded = Degraded(clock)  # Redis out of reach: why, since when, the shares
        self.counters = {"allowed": 0, "queued": 0, "refused": 0, "redis_fallbacks": 0, "unavailable": 0,
                         "lag_retries": 0}  # fmt: skip
        self._leases: dict[str, Taken] = {}
        self._pending: list[tuple[Sequence[Check], str | None, int]] = []
        self._wake = asyncio.Event()
        self._freed = asyncio.Event()  # a concurrency slot was returned: the queue's head tries again
        self.queues = PriorityQueues(clock, self._freed)
        # provider, or (provider, caller) when it has caller rules -> its checks
        self._check_cache: dict[str | tuple[str, str], Checks] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._idle: tuple[str, ...] = ()  # hooks with nothing to do under the policy (set by configure)

    def setup(self, runtime: Runtime) -> None:
        self.runtime = runtime

    def configure(self, policy: Policy) -> None:
        self._check_cache = {}  # rules may have changed
        redis = self.runtime.redis if self.runtime is not None else None
        if redis is None:
            self.shared = None
        elif self.shared is None or self.shared.client is not redis:
            timeout = policy.redis.timeout if policy.redis else 0.5
            self.shared = RedisLimiter(redis, lease_ttl=LEASE_TTL, timeout=timeout)
        self.on_failure = policy.redis.on_failure if policy.redis else "open"
        # Hooks with nothing to count under this policy are not called at all (the
        # common policy has no limits). response/error always run: they settle
        # what flows admitted under the previous policy still hold.
        limited = any(p.limits or p.caller_limits for p in policy.providers)
        keyed = any(t.limits for p in policy.providers for t in p.targets)
        self._idle = (*(() if limited else ("request", "responseheaders")), *(() if keyed else ("upstream_attempt",)))

    def running(self) -> None:
        self._tasks = [
            asyncio.create_task(self._refresh_leases(), name="sidekey-limit-leases"),
            asyncio.create_task(self._settle_loop(), name="sidekey-limit-settle"),
            asyncio.create_task(self.degraded.lag.run(), name="sidekey-loop-lag"),
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
        key = provider.name if not provider.caller_limits else (provider.name, flow.caller)
        checks = self._check_cache.get(key)
        if checks is None:
            checks = self._new_checks(key, provider, flow.caller)
        tokens = 0
        if checks.token_pairs:
            req = flow.request
            if req.body:
                tokens = flow.metadata["reserve"] = reservation(req.body, req.content_length)
            else:  # a GET, a HEAD: it generates no tokens, so token rules neither count nor refuse it
                checks = checks.tokenless
                if checks is None:
                    return None
        priority = flow.request.headers.pop("x-sidekey-priority", None)
        if self.shared is None and checks.bound is not None:  # local: decided here; a coroutine only to wait
            remaining = self.local.take(checks.bound, tokens, self.clock())
            if remaining is not None:
                self.counters["allowed"] += 1
                flow.metadata["limits"] = Taken(checks, tokens, self.local, None, remaining)
                log.debug("flow %s: limits allow, %d tokens reserved", flow.id, tokens)
                return None
        rank = PRIORITIES.get(priority.strip().lower(), 1) if priority else 1
        return self._limit(flow, provider, checks, tokens, rank)

    def _new_checks(self, key: str | tuple[str, str], provider: Provider, caller: str) -> Checks:
        built = [(f"provider:{provider.name}", r) for r in provider.limits]
        built += [(f"caller:{provider.name}/{caller}", r) for r in provider.caller_limits]
        if len(self._check_cache) >= 4096:  # callers come from requests: bounded
            self._check_cache.clear()
        checks = self._check_cache[key] = Checks.for_requests(tuple(built), self.local)
        return checks

    async def _limit(self, flow: Flow, provider: Provider, checks: Checks, tokens: int, rank: int) -> None:
        try:
            taken = await self._take(provider, checks, tokens, rank)
        except errors.ProxyError as err:
            log.debug("flow %s: limits refuse (%s)", flow.id, err.code)
            flow.response = Response.from_error(err)
            if isinstance(err, RateLimited):
                flow.response.headers["retry-after"] = str(err.fields["seconds"])
            return
        log.debug("flow %s: limits allow, %d tokens reserved", flow.id, tokens)
        flow.metadata["limits"] = taken

    def responseheaders(self, flow: Flow) -> None:
        taken = flow.metadata.get("limits") if flow.metadata else None
        if taken is None or flow.response is None:
            return
        headers = flow.response.headers
        # ours, per rule; the provider's own x-ratelimit-* pass untouched. Indexed: zip(strict=True)
        # costs as much as the four headers, and this runs on every answer.
        left = taken.remaining
        for i, (limit, value, remaining) in enumerate(taken.checks.headers):
            headers[limit] = value
            headers[remaining] = str(left[i])

    def response(self, flow: Flow) -> None:
        self._settle(flow)

    def error(self, flow: Flow) -> None:
        self._settle(flow)

    # -- per-key limits ---------------------------------------------------------------
    def idle_hooks(self) -> tuple[str, ...]:
        return self._idle

    def upstream_attempt(self, flow: Flow, attempt: Attempt) -> Awaitable[None] | None:
        if not attempt.member.target.limits or attempt.probe:  # a health check takes no quota
            return None
        return self._admit(flow, attempt)

    async def _admit(self, flow: Flow, attempt: Attempt) -> None:
        attempt.hold_off = await self.admit_member(flow, attempt.provider, attempt.member)

    async def admit_member(self, flow: Flow, provider: Provider, state: UpstreamState) -> float:
        """Take the member's own rules; 0 when admitted, else seconds until it could be."""
        checks = Checks(tuple((f"upstream:{provider.name}/{state.name}", r) for r in state.target.limits))
        tokens = self._tokens(flow) if checks.token_pairs else 0
        try:
            verdict, limiter = await self._acquire(checks, tokens)
        except LimitsUnavailable:
            return 1.0
        if not verdict.allowed:
            if math.isinf(verdict.retry_after):  # this key can never take it; another key may
                raise over_limit(provider, verdict, tokens)
            return max(verdict.retry_after, 0.001)
        flow.metadata.setdefault("member_limits", []).append(self._held(Taken(checks, tokens, limiter, verdict.lease)))
        return 0.0

    def count_cached(self, flow: Flow) -> Awaitable[None] | None:
        """A cache hit or follower (``cache.count_hits: caller``) takes one request from the
        caller's request rules, which protect the caller; over one it gets 429 like any request.
        Provider, token and concurrency rules (which protect the upstream) never see it."""
        provider = flow.provider
        rules = [r for r in provider.caller_limits if r.kind == "requests"] if provider is not None else []
        if provider is None or not rules:
            return None
        pairs = tuple((f"caller:{provider.name}/{flow.caller}", r) for r in rules)
        return self._limit(flow, provider, Checks.for_requests(pairs, self.local), 0, PRIORITIES["normal"])

    # -- sessions (a WebSocket's responses: proxy.ws_session) ----------------------------
    def reserve_tokens(self, flow: Flow, tokens: int) -> None:
        """Count a response's reservation in the flow's token rules now. Never
        refused: the event asking for it is already on its way upstream; the
        window it fills makes new requests and sessions wait."""
        self._correct_tokens(flow, tokens)

    def settle_tokens(self, flow: Flow, reserved: int, used: int) -> None:
        self._correct_tokens(flow, used - reserved)

    def _correct_tokens(self, flow: Flow, delta: int) -> None:
        provider = flow.provider
        if not delta or provider is None or not (provider.limits or provider.caller_limits):
            return
        key = provider.name if not provider.caller_limits else (provider.name, flow.caller)
        checks = self._check_cache.get(key) or self._new_checks(key, provider, flow.caller)
        if not checks.token_pairs:
            return
        if self.shared is not None:  # batched with the releases (a lease of None: tokens only)
            self._pending.append((checks.token_pairs, None, delta))
            self._wake.set()
        else:
            self.local.reconcile(checks.token_pairs, delta, self.clock())

    # -- internals ------------------------------------------------------------------
    def _tokens(self, flow: Flow) -> int:
        """Tokens to reserve (``addons.usage.tokens.reservation``), once per request."""
        reserved = flow.metadata.get("reserve")
        if reserved is None:
            reserved = flow.metadata["reserve"] = reservation(flow.request.body, flow.request.content_length)
        return int(reserved)

    async def _take(self, provider: Provider, checks: Checks, tokens: int, priority: int) -> Taken:
        """Acquire, waiting in the provider's priority queue up to ``queue_wait``."""
        verdict, limiter = await self._acquire(checks, tokens)
        if not verdict.allowed:
            if math.isinf(verdict.retry_after):  # more than a whole window: waiting cannot help
                self.counters["refused"] += 1
                raise over_limit(provider, verdict, tokens)
            if provider.queue_wait > 0 and (verdict.retry_after <= provider.queue_wait or by_concurrency(verdict)):
                self.counters["queued"] += 1
                log.debug("provider %s: over %s, queued", provider.name, verdict.refused_by)
                verdict, limiter = await self.queues.wait(
                    provider, priority, (verdict, limiter), lambda: self._acquire(checks, tokens)
                )
        if verdict.allowed:
            self.counters["allowed"] += 1
            return self._held(Taken(checks, tokens, limiter, verdict.lease, remaining_of(verdict)))
        self.counters["refused"] += 1
        scope = (verdict.refused_by or "provider").split(":", 1)[0]
        seconds = 1 if math.isinf(verdict.retry_after) else max(1, math.ceil(verdict.retry_after))
        raise RateLimited(provider.name, scope=scope, seconds=seconds)

    def _held(self, taken: Taken) -> Taken:
        if taken.lease is not None:  # a Redis lease: refreshed while the flow lives
            self._leases[taken.lease] = taken
        return taken

    async def _acquire(self, checks: Checks, tokens: int) -> tuple[Verdict, LocalLimiter | RedisLimiter]:
        shared = self.shared
        if shared is None:
            return self.local.acquire(checks.pairs, tokens, self.clock()), self.local
        settles, self._pending = self._pending, []  # ride along: no round trip of their own
        try:
            verdict = await shared.acquire(checks.pairs, tokens, settles=settles)
        except LimiterUnavailable as exc:
            self._pending[:0] = settles  # try them again later (leases expire meanwhile anyway)
            # Already degraded: no retry, so a request waits one timeout, not two.
            if self.degraded.active or not self.degraded.retry(exc, shared.timeout):
                return self._degrade(checks, tokens, shared, exc)
            self.counters["lag_retries"] += 1  # a starved loop, not evidence against Redis
            try:
                verdict = await shared.acquire(checks.pairs, tokens)
            except LimiterUnavailable as again:
                return self._degrade(checks, tokens, shared, again)
        self.degraded.recovered()
        return verdict, shared

    def _degrade(
        self, checks: Checks, tokens: int, shared: RedisLimiter, exc: LimiterUnavailable
    ) -> tuple[Verdict, LocalLimiter]:
        """Redis is out of reach: refuse (closed), or take this process's share locally (open)."""
        self.degraded.enter(exc, shared.timeout, shared.sidecars, self.on_failure)
        if self.on_failure == "closed":
            self.counters["unavailable"] += 1
            raise LimitsUnavailable() from None
        self.counters["redis_fallbacks"] += 1
        pairs = self.degraded.share(checks.pairs, shared.sidecars)
        return self.local.acquire(pairs, tokens, self.clock()), self.local

    def _settle(self, flow: Flow) -> None:
        meta = flow.metadata
        if not meta:
            return
        taken = meta.pop("limits", None)
        if taken is not None:
            self._release(taken, meta.get("usage"))
        if "member_limits" in meta:
            for held in meta.pop("member_limits"):
                self._release(held, meta.get("usage"))

    def _release(self, taken: Taken, measured: Usage | None) -> None:
        """Return what ``taken`` holds, correcting its token reservation by what was measured."""
        delta = measured.total - taken.tokens if measured is not None and taken.tokens else 0
        if taken.limiter is not self.local:  # Redis's: sent in the next batch
            self._leases.pop(taken.lease or "", None)
            if taken.lease is not None or delta:  # batched: one pipeline for many requests
                self._pending.append((taken.checks.pairs, taken.lease, delta))
                self._wake.set()
            return
        if delta:  # through the bound pairs when there are (no lookups), else the token rules
            self.local.reconcile(taken.checks.bound or taken.checks.token_pairs, delta, self.clock())
        if taken.checks.has_slots and self.local.release(taken.checks.pairs):
            self._freed.set()  # the queue's head may take the slot now

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
                        await taken.limiter.refresh(taken.checks.pairs, taken.lease)

    def statistics(self) -> dict[str, Any]:
        return {**self.counters, "shared": self.shared is not None and not self.degraded.active,
                "degraded_seconds": self.degraded.seconds(), "local": self.local.statistics()}  # fmt: skip

    def __repr__(self) -> str:
        return f"Limits(shared={self.shared is not None}, {self.counters})"


__all__ = ["Limits", "LimitsUnavailable", "RateLimited", "Rule"]
