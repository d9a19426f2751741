"""The response cache and request coalescing, as an addon (``cache:`` per provider).

Hooks, and why each sits where it does (after credentials, provider headers
and the usage meter; before limits):
- ``request``: reads and removes the caller's cache headers, builds the key,
  answers a fresh entry locally (so limits never see a hit), or waits for an
  identical request in flight and answers with its pieces (a follower), or
  leads (a miss). An expired entry still within ``stale_if_error`` is left
  as the flow's ``error_answer`` for when every upstream fails.
- ``responseheaders``: an upstream error with a stale entry at hand answers
  the stale entry; a storable head starts recording the body (the recorder
  wraps the usage meter's observer, which it feeds on) and tells followers.
- ``response`` / ``error``: store the recording when it ended cleanly; end
  the flight either way.

A flow of a provider without ``cache:`` pays one attribute test per hook;
with no ``cache:`` anywhere the hooks are idle (not called).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from addons.cache import rules
from addons.cache.backends import Backends
from addons.cache.cluster import WAIT, ClusterLocks
from addons.cache.flight import Flight
from addons.cache.following import follower_stream
from addons.cache.key import cache_key, group_identity
from addons.cache.pending import Pending
from addons.cache.recorder import Recorder
from addons.cache.sse import StreamJudge
from addons.cache.stats import CacheStats
from addons.cache.stores import Entry
from proxy.capabilities import CACHE_ADMIN, CACHED_REQUESTS, CACHED_USAGE, SECRETS
from proxy.flow import Flow, Response
from proxy.policy import CachePolicy, Policy, Provider

if TYPE_CHECKING:
    from proxy.capabilities import CachedRequests, CachedUsage, Secrets
    from proxy.runtime import Runtime

log = logging.getLogger("sidekey.cache")


class Cache:
    name = "cache"
    provides = (CACHE_ADMIN,)

    def __init__(self, *, clock: Any = time.time) -> None:
        self.clock = clock
        self.runtime: Runtime | None = None
        self.policy: Policy | None = None
        self.backends = Backends(clock=clock)
        self.flights: dict[str, Flight] = {}
        self.stats = CacheStats()
        self._secrets: Secrets | None = None
        self._usage: CachedUsage | None = None
        self._limits: CachedRequests | None = None
        self._identity_key = os.urandom(32)  # this process's; the Redis-shared one replaces it

    # -- lifecycle ---------------------------------------------------------------------
    def setup(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self._secrets = runtime.capability(SECRETS)
        self._usage = runtime.capability(CACHED_USAGE)
        self._limits = runtime.capability(CACHED_REQUESTS)

    def configure(self, policy: Policy) -> None:
        self.policy = policy
        self.backends.configure(policy, self.runtime.redis if self.runtime is not None else None)

    def idle_hooks(self) -> tuple[str, ...]:
        """No provider has a cache: the flow hooks are not called at all."""
        if self.policy is not None and any(p.cache is not None for p in self.policy.providers):
            return ()
        return ("request", "responseheaders", "response", "error")

    async def running(self) -> None:
        redis = self.backends.redis
        if redis is not None:
            try:
                self._identity_key = await redis.hmac_key(self._identity_key)
            except Exception as exc:  # noqa: BLE001 - a down Redis: entries of this process only
                log.warning("cache: cannot read the shared identity key from Redis (%s)", type(exc).__name__)

    async def done(self) -> None:
        await self.backends.drain()

    # -- hooks ---------------------------------------------------------------------------
    def request(self, flow: Flow) -> Awaitable[None] | None:
        provider = flow.provider
        if provider is None or provider.cache is None:
            return None
        policy = provider.cache
        req = flow.request
        directives = rules.directives(req.headers, policy)
        body = req.body
        if not policy.method_cached(req.method, req.path) or not (body is None or type(body) is bytes):
            flow.metadata["cache"] = "bypass"
            return None
        key = cache_key(
            provider=provider.name, identity=group_identity(self._secrets, provider, self._identity_key),
            caller=flow.caller if policy.scope == "caller" else None, method=req.method, target=req.path,
            headers=req.headers, vary=policy.vary, body=body or b"",
        )  # fmt: skip
        if self.backends.shared(policy) is not None:
            return self._lookup_redis(flow, provider, policy, directives, key)
        entry = self.backends.local(provider.name, key)
        return self._decide(flow, provider, policy, directives, key, entry)

    def responseheaders(self, flow: Flow) -> None:
        meta = flow.metadata
        pending: Pending | None = meta.get("cache_state") if meta else None
        if pending is None:
            if meta and meta.get("cache") == "bypass" and flow.response is not None:
                flow.response.headers[rules.CACHE_HEADER] = "bypass"
            return
        resp = flow.response
        assert resp is not None and flow.provider is not None
        policy, flight = pending.policy, pending.flight
        if pending.stale is not None and (resp.status >= 500 or resp.status == 429):
            flow.response = self._answer(pending.stale, "stale")
            meta["cache"] = "stale"
            return
        headers = resp.headers
        state = flow.upstream_state
        length = headers.get("content-length")
        # Followers may share any answer that could be stored by its head: one
        # too large to store is still streamed to them (within the window).
        shareable = rules.storable_head(resp.status, headers, policy) and (
            state is None or state.provider == flow.provider.name  # never a fallback's answer
        )
        sse = headers.get("content-type", "").startswith("text/event-stream")
        storable = (
            shareable
            and pending.directives.store
            and (length is None or (length.isdigit() and int(length) <= policy.max_entry_bytes))
            # a compressed stream cannot be judged
            and not (sse and headers.get("content-encoding", "identity").strip().lower() != "identity")
        )
        if flight is not None:
            if shareable:
                flight.head(resp.status, CIMultiDict(headers))
                meta["read_for_others"] = flight.has_followers  # the leader's client may leave first
            else:
                self._end_flight(flight, ok=False)
                flight = pending.flight = None
        if storable or flight is not None:
            recorder = Recorder(flow.body_observer, policy.max_entry_bytes if storable else -1,
                                StreamJudge() if sse else None, flight)  # fmt: skip
            if not storable:
                recorder.pieces = None
            flow.body_observer = pending.recorder = recorder
        headers[rules.CACHE_HEADER] = meta.get("cache", "miss")
        headers["age"] = "0"

    def response(self, flow: Flow) -> None:
        meta = flow.metadata
        if not meta:
            return
        pending: Pending | None = meta.pop("cache_state", None)
        if "error_answered" in meta:  # every upstream failed: the stale entry answered
            meta["cache"] = "stale"
        result = meta.get("cache")
        if result is not None and flow.provider is not None:
            self.stats.count(flow.provider.name, result)
            if result == "hit" or result == "coalesced":
                self._account(flow, flow.provider.name, meta)
        if pending is not None:
            self._settle(flow, pending)

    def error(self, flow: Flow) -> None:
        meta = flow.metadata
        if not meta:
            return
        pending: Pending | None = meta.pop("cache_state", None)
        if flow.provider is not None and "cache" in meta:
            self.stats.count(flow.provider.name, "error")
        if pending is None:
            return
        if meta.get("upstream_complete") and pending.recorder is not None:
            # The leader's client left, but the upstream answer was read to its end
            # for the followers (proxy.responses): stored and shared as if it had stayed.
            self._settle(flow, pending)
            return
        self._unlock(pending, None)
        if pending.flight is not None:
            self._end_flight(pending.flight, ok=False)

    def _settle(self, flow: Flow, pending: Pending) -> None:
        """A leader's answer ended: store it when it may be, free the cluster lock, end the flight."""
        meta = flow.metadata
        recorder = pending.recorder
        entry = written = None
        if recorder is not None and recorder.pieces is not None and recorder.clean and meta.get("cache") == "miss":
            entry = self._entry(flow, pending, b"".join(recorder.pieces))
            written = self.backends.put(pending.key, entry, pending.policy)
        self._unlock(pending, written)
        if pending.flight is not None:
            cost = meta.get("cost")
            pending.flight.saved_usd = float(cost) if isinstance(cost, float | int) else 0.0
            self._end_flight(pending.flight, ok=entry is not None or recorder is not None)

    # -- internals -----------------------------------------------------------------------
    async def _lookup_redis(self, flow: Flow, provider: Provider, policy: CachePolicy, directives: rules.Directives,
                            key: str) -> None:  # fmt: skip
        entry = await self.backends.fetch(provider.name, key) if directives.lookup else None
        waited = self._decide(flow, provider, policy, directives, key, entry)
        if waited is not None:
            await waited
        elif policy.coalesce_cluster and self.backends.locks is not None:
            pending: Pending | None = flow.metadata.get("cache_state")
            if pending is not None and pending.flight is not None:  # leads here: and across sidecars?
                await self._lead_cluster(flow, policy, pending, self.backends.locks)

    async def _lead_cluster(self, flow: Flow, policy: CachePolicy, pending: Pending, locks: ClusterLocks) -> None:
        """Take the key's Redis lock and lead, or wait for the sidecar that holds it
        (``addons.cache.cluster``); its entry answers this flow and the followers here."""
        provider = flow.provider
        assert provider is not None and pending.flight is not None
        deadline = asyncio.get_running_loop().time() + WAIT
        while True:
            token = await locks.acquire(provider.name, pending.key)
            if token is not None:
                pending.lock = (provider.name, token)
                return
            entry = await locks.wait(provider.name, pending.key, deadline)
            if entry is not None:
                flight = pending.flight
                flight.saved_usd = entry.saved_usd
                flight.head(entry.status, CIMultiDict(entry.headers))
                flight.publish(entry.body)
                self._end_flight(flight, ok=True)
                del flow.metadata["cache_state"]
                flow.response = self._answer(entry, "coalesced")
                flow.metadata.update(cache="coalesced", cache_saved=entry.saved_usd)
                counting = self._count(flow, policy)
                if counting is not None:
                    await counting
                return
            if asyncio.get_running_loop().time() >= deadline:
                return  # waited long enough: upstream, without the lock

    def _unlock(self, pending: Pending, written: asyncio.Task[None] | None) -> None:
        """The flow led across sidecars: free its lock once its entry is written (or now)."""
        if pending.lock is not None and self.backends.locks is not None:
            provider, token = pending.lock
            self.backends.locks.release(provider, pending.key, token, written)
            pending.lock = None

    def _decide(self, flow: Flow, provider: Provider, policy: CachePolicy, directives: rules.Directives, key: str,
                entry: Entry | None) -> Awaitable[None] | None:  # fmt: skip
        now = self.clock()
        if entry is not None and directives.lookup and entry.fresh(now):
            flow.response = self._answer(entry, "hit", now)
            flow.metadata["cache"] = "hit"
            flow.metadata["cache_saved"] = entry.saved_usd
            return self._count(flow, policy)
        stale = entry if entry is not None and policy.stale_if_error and entry.usable_stale(now) else None
        if stale is not None:
            flow.metadata["error_answer"] = self._answer(stale, "stale", now)
        flight = None
        if policy.coalesce and directives.lookup:
            flight = self.flights.get(key)
            if flight is not None and flight.open:
                return self._follow(flow, provider, policy, directives, key, flight, stale)
            flight = self.flights[key] = Flight(key, policy.max_entry_bytes)
        flow.metadata["cache"] = "miss" if directives.lookup else "bypass"
        flow.metadata["cache_state"] = Pending(key, policy, directives, stale, flight)
        return None

    async def _follow(self, flow: Flow, provider: Provider, policy: CachePolicy, directives: rules.Directives,
                      key: str, flight: Flight, stale: Entry | None) -> None:  # fmt: skip
        """Wait for the leader; if it fails before we saw a byte, look again
        (an entry may be there now), then follow or lead the next flight."""
        while True:
            flight.followers += 1
            self.stats.count(provider.name, "coalesced_wait")
            # From the first piece: a follower never waits for the whole answer,
            # and one larger than the window is streamed rather than lost.
            started = await flight.wait_start()
            if started:
                assert flight.status is not None and flight.headers is not None
                headers = CIMultiDict(flight.headers)
                headers[rules.CACHE_HEADER] = "coalesced"
                headers["age"] = "0"
                for name in ("x-sidekey-request-id", "x-sidekey-attempts", "x-sidekey-provider", "x-sidekey-upstream"):
                    headers.popall(name, None)
                whole = flight.body() if flight.done else None
                if whole is not None:
                    flow.response = Response(flight.status, headers, whole)
                else:
                    sse = headers.get("content-type", "").startswith("text/event-stream")
                    flow.response = Response(flight.status, headers, stream=follower_stream(flight, provider, sse))
                flow.metadata["cache"] = "coalesced"
                flow.metadata["cache_flight"] = flight
                counting = self._count(flow, policy)
                if counting is not None:
                    await counting
                return
            entry = self.backends.local(provider.name, key)
            waited = self._decide(flow, provider, policy, directives, key, entry)
            if waited is None:
                return  # a hit, or we lead now
            nxt = self.flights.get(key)
            if nxt is None:
                return
            flight = nxt

    def _count(self, flow: Flow, policy: CachePolicy) -> Awaitable[None] | None:
        """``count_hits: caller``: the answer takes one request from the caller's rules."""
        if policy.count_hits != "caller" or self._limits is None:
            return None
        answer = flow.response
        waiting = self._limits.count_cached(flow)
        return None if waiting is None else self._counted(flow, answer, waiting)

    async def _counted(self, flow: Flow, answer: Response | None, waiting: Awaitable[None]) -> None:
        await waiting
        if flow.response is not answer:  # refused (429): not answered from the cache after all
            flow.metadata.pop("cache", None)

    def _account(self, flow: Flow, provider: str, meta: dict[str, Any]) -> None:
        """A hit or follower answered: what it saved, in the stats and the usage ledger."""
        flight: Flight | None = meta.get("cache_flight")
        saved = flight.saved_usd if flight is not None else meta.get("cache_saved", 0.0)
        self.stats.saved(provider, saved)
        if self._usage is not None:
            self._usage.record_cached(flow, saved)

    def _answer(self, entry: Entry, result: str, now: float | None = None) -> Response:
        headers: CIMultiDict[str] = CIMultiDict(entry.headers)
        headers[rules.CACHE_HEADER] = result
        headers["age"] = str(int(entry.age(self.clock() if now is None else now)))
        return Response(entry.status, headers, entry.body)

    def _entry(self, flow: Flow, pending: Pending, body: bytes) -> Entry:
        resp = flow.response
        assert resp is not None and flow.provider is not None
        meta = flow.metadata
        cost = meta.get("cost")
        usage = meta.get("usage")
        tokens = (usage.input + usage.output) if usage is not None else 0
        return Entry(flow.provider.name, flow.request.path.split("?", 1)[0], resp.status,
                     rules.replayed_headers(resp.headers), body, self.clock(), pending.directives.ttl,
                     pending.policy.stale_if_error, float(cost) if isinstance(cost, float | int) else 0.0,
                     tokens)  # fmt: skip

    def _end_flight(self, flight: Flight, *, ok: bool) -> None:
        if self.flights.get(flight.key) is flight:
            del self.flights[flight.key]
        if ok:
            flight.finish()
        else:
            flight.fail()

    # -- operations ----------------------------------------------------------------------
    async def delete(self, provider: str | None, pattern: str) -> int:
        providers = self.policy.providers if self.policy is not None else ()
        names = [p.name for p in providers
                 if p.cache is not None and p.cache.backend == "redis" and provider in (None, p.name)]  # fmt: skip
        return await self.backends.delete(provider, pattern, names)

    async def report(self) -> dict[str, Any]:
        providers: dict[str, Any] = {}
        for p in self.policy.providers if self.policy is not None else ():
            if p.cache is not None:
                providers[p.name] = {**self.stats.view(p.name), **await self.backends.view(p.name),
                                     "backend": p.cache.backend}  # fmt: skip
        following = sum(f.followers for f in self.flights.values())
        return {"providers": providers, "in_flight": len(self.flights), "following": following}

    def statistics(self) -> dict[str, Any]:
        return {"flights": len(self.flights), **self.backends.statistics()}

    def __repr__(self) -> str:
        return f"Cache({self.backends!r}, {len(self.flights)} flights)"
