"""One dynamic credential held between fetches: single flight, ttl,
stale_for, backoff. The request path calls ``value()`` (synchronous, no
await, no lock); fetching happens in ``refresh()``, awaited by the
background refresher, by a first request that finds no value, or by an
operator's forced re-read.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.credentials.model import Credential, Freshness, Plan, Source, SourceError, freshness, plan, retry_at
from proxy.policy.credential_model import Timing
from proxy.secrets import check_value

log = logging.getLogger("sidekey.credentials")


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one ``refresh()`` call saw (for metrics: ``result``)."""

    result: str  # "ok", "error" or "shared" (joined a fetch already in flight)
    changed: bool = False


class CachedCredential:
    def __init__(self, source: Source, timing: Timing, *, clock: Callable[[], float] = time.time) -> None:
        self.source = source
        self.timing = timing
        self.clock = clock
        self.cred: Credential | None = None
        self.plan: Plan | None = None
        self.failures = 0
        self.problem: str | None = None  # the last failure, a fixed phrase
        self.next_attempt = 0.0  # when the refresher tries again (0: now)
        self.fetched_at: float | None = None  # last good read
        self.counts = {"ok": 0, "error": 0, "shared": 0}
        self.lazy = False  # fetched on first use (OAuth2), not by the refresher before
        self.refreshed_at: float | None = None  # the last fetch that ended, good or not (admin)
        self._inflight: asyncio.Future[Outcome] | None = None

    def value(self) -> str | None:
        """The value to inject now, or None (fail closed)."""
        cred, p = self.cred, self.plan
        if cred is None or p is None or self.clock() >= p.usable_until:
            return None
        return cred.value

    def due(self, now: float) -> bool:
        """Whether the refresher should fetch now."""
        if now < self.next_attempt:
            return False
        return self.plan is None or now >= self.plan.refresh_at or self.failures > 0

    def wake_at(self) -> float:
        if self.failures or self.plan is None:
            return self.next_attempt
        return max(self.plan.refresh_at, self.next_attempt)

    def state(self) -> Freshness:
        return freshness(self.clock(), self.plan, self.failures)

    @property
    def busy(self) -> bool:
        return self._inflight is not None

    def invalidate(self) -> None:
        """The upstream refused the value: re-read it at once (it is still
        served until a new one arrives; a refused one fails either way)."""
        if self.plan is not None:
            self.plan = Plan(min(self.plan.refresh_at, self.clock()), self.plan.usable_until)
        self.next_attempt = 0.0

    async def refresh(self) -> Outcome:
        """Fetch now, or join the fetch already in flight (one per secret)."""
        if self._inflight is not None:
            self.counts["shared"] += 1
            outcome = await asyncio.shield(self._inflight)
            return Outcome("shared", outcome.changed)
        fut: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._inflight = fut
        try:
            outcome = await self._fetch()
            fut.set_result(outcome)
            return outcome
        except BaseException as exc:  # cancelled: the joiners must not hang
            fut.set_exception(exc)
            fut.exception()  # retrieved: no "never retrieved" warning when nobody joined
            raise
        finally:
            self._inflight = None

    async def _fetch(self) -> Outcome:
        try:
            return await self._fetch_once()
        finally:
            self.refreshed_at = self.clock()

    async def _fetch_once(self) -> Outcome:
        try:
            cred = await self.source.fetch()
        except SourceError as exc:
            return self._failed(str(exc))
        except (TimeoutError, OSError, ValueError) as exc:
            return self._failed(f"failed ({type(exc).__name__})")
        value, problem = check_value(cred.value)
        if value is None:
            return self._failed(f"value {problem}")
        if value != cred.value:
            cred = Credential(value, cred.expires_at)
        now = self.clock()
        new_plan = plan(self.timing, now, cred)
        if now >= new_plan.usable_until:  # expired on arrival (clock skew, expires_in 0): not a success
            return self._failed("value arrived already expired")
        changed = self.cred is None or self.cred.value != cred.value
        if self.failures or self.cred is None:
            log.info("credential %s is available", self.source.source)
        self.cred, self.fetched_at = cred, now
        self.plan = new_plan
        self.failures, self.problem, self.next_attempt = 0, None, 0.0
        self.counts["ok"] += 1
        return Outcome("ok", changed)

    def _failed(self, problem: str) -> Outcome:
        now = self.clock()
        self.failures += 1
        self.next_attempt = retry_at(now, self.failures, self.plan)
        if problem != self.problem:  # once per distinct problem, not per retry
            served = self.plan is not None and now < self.plan.usable_until
            log.warning("credential %s: %s (%s)", self.source.source, problem,
                        "serving the last good value" if served else "not available")  # fmt: skip
        self.problem = problem
        self.counts["error"] += 1
        return Outcome("error")

    def statistics(self) -> dict[str, object]:
        return {"state": self.state(), "failures": self.failures, **self.counts}

    def __repr__(self) -> str:  # never the value
        return f"CachedCredential({self.source.source!r}, state={self.state()}, failures={self.failures})"
