"""The limits addon's state while shared limits cannot reach Redis (``on_failure: open``/``closed``).

Kept apart from the request path: nothing here runs while Redis answers, except ``recovered``'s
one comparison. Why Redis was declared out of reach, this sidecar's share of each rule, and how
long limits were counted alone (``sidekey_limits_degraded_seconds_total``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from addons.limits.arithmetic import Check, share
from addons.limits.redis_limiter import LimiterUnavailable
from proxy.looplag import LoopLag, blame

log = logging.getLogger("sidekey.limits")


class Degraded:
    __slots__ = ("clock", "lag", "since", "ended_seconds", "_shares")

    def __init__(self, clock: Callable[[], float]) -> None:
        self.clock = clock
        self.lag = LoopLag(clock=clock)  # run by the addon's ``running``
        self.since: float | None = None  # clock() when Redis was declared out of reach
        self.ended_seconds = 0.0  # over the outages that ended
        self._shares: dict[tuple[tuple[Check, ...], int], tuple[Check, ...]] = {}

    @property
    def active(self) -> bool:
        return self.since is not None

    def seconds(self) -> float:
        """Time counted alone, the current outage included."""
        return self.ended_seconds + (self.clock() - self.since if self.since is not None else 0.0)

    def lag_at(self, exc: LimiterUnavailable, timeout: float) -> float:
        """The loop's recent lag, or how late the call's own timeout fired when that is more."""
        late = exc.elapsed - timeout if exc.reason == "timeout" else 0.0
        return max(self.lag.current(self.clock()), late)

    def retry(self, exc: LimiterUnavailable, timeout: float) -> bool:
        """Whether a failed call is the loop's doing, worth one more try (``looplag.blame``)."""
        return blame(exc.reason, self.lag_at(exc, timeout), timeout) == "loop"

    def enter(self, exc: LimiterUnavailable, timeout: float, sidecars: int, on_failure: str) -> None:
        """Redis declared out of reach: logged once per outage, with why."""
        if self.since is not None:
            return
        self.since = self.clock()
        why = exc.reason
        if why == "timeout":
            lag = self.lag_at(exc, timeout)
            why = f"timeout after {exc.elapsed * 1000:.0f} ms with loop lag {lag * 1000:.0f} ms"
        if on_failure == "closed":
            log.error("redis unreachable (%s): limits refuse requests (on_failure: closed)", why)
        else:
            log.error("redis unreachable (%s): limits fall back to this process's share, 1/%d of each limit "
                      "(%d sidecars seen in the last minute)", why, sidecars, sidecars)  # fmt: skip

    def recovered(self) -> None:
        if self.since is not None:
            self.ended_seconds += self.clock() - self.since
            self.since = None
            log.warning("redis reachable again: limits are shared")

    def share(self, pairs: tuple[Check, ...], sidecars: int) -> tuple[Check, ...]:
        """``pairs`` with each rule cut to this process's share; made once per rule set and count,
        so the local states keep one rule object (a new one is a policy reload to them)."""
        got = self._shares.get((pairs, sidecars))
        if got is None:
            if len(self._shares) >= 4096:
                self._shares.clear()
            got = self._shares[(pairs, sidecars)] = tuple((scope, share(rule, sidecars)) for scope, rule in pairs)
        return got
