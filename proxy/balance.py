"""Upstream groups: the live state of each member and the choice of the next
one to try. Pure: ``now`` and the random source are passed in.

Selection (as the issue and Envoy's priority levels have it): the lowest
priority that has a usable member wins; within it, healthy members are
preferred, then one is chosen by the provider's ``balance``:

- ``weighted``: random, in proportion to weight x availability score;
- ``least_in_flight``: fewest requests in flight per unit of weight;
- ``latency``: lowest decaying average of time to response headers.

A member is usable when its circuit lets a request through, its credential
is present and no 429 told it to rest. Unhealthy members are skipped while
healthy ones exist, but never starved: a circuit whose cooldown is over
gets its probe, and a member unhealthy from live traffic gets a request
every ``PROBE_EVERY`` seconds to show it recovered. Within one request, members already tried are
skipped while untried ones remain (a throttled key hands over to the next
key at once); when all were tried, they are tried again after backoff.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Literal

from proxy.circuit import Breaker
from proxy.policy import Balance, Provider, Target

Transition = Literal["circuit_open", "circuit_closed", "unhealthy", "healthy"]

NO_CHANGES: tuple[Transition, ...] = ()
EWMA = 0.2  # weight of the newest sample in the decaying averages
UNHEALTHY_AFTER = 3  # consecutive failures from live traffic mark a member unhealthy
MAX_REST = 300.0  # a 429's reset hint is believed up to this many seconds
MIN_SCORE = 0.05  # a failing member still gets a trickle when weighted (it may recover)
PROBE_EVERY = 10.0  # seconds between live requests to a member unhealthy from live traffic
FLAP_WINDOW = 60.0  # seconds: a member's health flips get one log line at their level per window


class UpstreamState:
    """One member of one provider's group (for wildcard providers, per host)."""

    __slots__ = ("provider", "target", "host", "port", "breaker", "in_flight", "latency", "error_rate",
                 "consecutive", "requests", "failures", "last_status", "last_error", "last_seen",
                 "active_ok", "active_streak", "last_checked", "healthy", "resting_until", "limited_until",
                 "flip_told_at", "flips_untold")  # fmt: skip

    def __init__(self, provider: Provider, target: Target, host: str, port: int) -> None:
        self.provider = provider.name
        self.target = target
        self.host = host
        self.port = port
        self.breaker = Breaker(provider.circuit)
        self.in_flight = 0
        self.latency = 0.0  # seconds to response headers, decaying average; 0 = no sample yet
        self.error_rate = 0.0  # decaying share of failed requests
        self.consecutive = 0
        self.requests = 0
        self.failures = 0
        self.last_status: int | None = None
        self.last_error: str | None = None  # an error code, never a message
        self.last_seen = 0.0  # monotonic time of the last outcome
        self.active_ok = True  # the active check's verdict (True when none is configured)
        self.active_streak = 0  # consecutive results that disagree with active_ok
        self.last_checked: float | None = None  # wall time of the last active check
        self.healthy = True
        # After a 429 that said how long to wait (a key's quota is spent), the
        # member gets nothing until then: the next request takes another key.
        self.resting_until = 0.0
        self.limited_until = 0.0  # this key's own limits (policy) are spent until then
        self.flip_told_at = float("-inf")  # monotonic time of the last health flip logged at its level
        self.flips_untold = 0  # flips since then, logged at DEBUG only

    @property
    def name(self) -> str:
        return self.target.name

    @property
    def score(self) -> float:
        """Availability in [MIN_SCORE, 1]: the share of recent requests that
        succeeded, cut to a tenth while unhealthy."""
        base = max(MIN_SCORE, 1.0 - self.error_rate)
        return base if self.healthy else max(MIN_SCORE, base * 0.1)

    def available(self, now: float) -> bool:
        return now >= self.resting_until and now >= self.limited_until and self.breaker.available(now)

    def record(self, failed: bool, now: float, *, latency: float | None = None, status: int | None = None,
               error: str | None = None, retry_after: float | None = None) -> Sequence[Transition]:  # fmt: skip
        """One outcome from live traffic; returns what changed (for alerts)."""
        before = self.breaker.state
        self.breaker.record(failed, now, retry_after)
        self.requests += 1
        self.last_seen = now
        self.last_status, self.last_error = status, error
        self.error_rate += EWMA * ((1.0 if failed else 0.0) - self.error_rate)
        if latency is not None:
            self.latency = latency if not self.latency else self.latency + EWMA * (latency - self.latency)
        if status == 429 and retry_after:
            # A little early: a retry that slept exactly the asked delay must find it ready.
            self.resting_until = now + min(retry_after, MAX_REST) - min(0.05, retry_after / 10)
        if failed:
            self.failures += 1
            self.consecutive += 1
        else:
            self.consecutive = 0
            if before == "closed" and self.healthy:
                return NO_CHANGES  # the common case: a success changes no state worth telling
        return self._transitions(before)

    def record_check(
        self, passed: bool, wall_time: float, healthy_after: int, unhealthy_after: int
    ) -> list[Transition]:
        """One active health check result."""
        self.last_checked = wall_time
        if passed == self.active_ok:
            self.active_streak = 0
        else:
            self.active_streak += 1
            if self.active_streak >= (healthy_after if passed else unhealthy_after):
                self.active_ok, self.active_streak = passed, 0
        if passed and self.active_ok:
            self.consecutive = 0  # a passing check is a success as far as passive health goes
        return self._transitions(self.breaker.state)

    def _transitions(self, before: str) -> list[Transition]:
        out: list[Transition] = []
        after = self.breaker.state
        if after == "open" and before != "open":
            out.append("circuit_open")
        elif after == "closed" and before != "closed":
            out.append("circuit_closed")
        healthy = self.active_ok and after == "closed" and self.consecutive < UNHEALTHY_AFTER
        if healthy != self.healthy:
            self.healthy = healthy
            out.append("healthy" if healthy else "unhealthy")
        return out

    def statistics(self) -> dict[str, object]:
        return {
            "name": self.name,
            "upstream": f"{self.host}:{self.port}",
            "healthy": self.healthy,
            "score": round(self.score, 3),
            "response_time": round(self.latency, 4) if self.latency else None,
            "error_rate": round(self.error_rate, 3),
            "consecutive_failures": self.consecutive,
            "requests": self.requests,
            "failures": self.failures,
            "in_flight": self.in_flight,
            "last_status": self.last_status,
            "last_error": self.last_error,
            "last_checked": self.last_checked,
            "weight": self.target.weight,
            "priority": self.target.priority,
            "circuit": self.breaker.statistics(),
        }

    def __repr__(self) -> str:
        return (f"UpstreamState({self.provider}/{self.name} {self.host}:{self.port} healthy={self.healthy} "
                f"in_flight={self.in_flight} {self.breaker!r})")  # fmt: skip


def flip_line(state: UpstreamState, change: Transition, now: float) -> int | None:
    """Whether a change is logged at its own level: circuit changes always (0); a member's
    healthy/unhealthy flip at most once per FLAP_WINDOW, answering how many flips went to
    DEBUG since its last such line; None: this flip goes to DEBUG. A member failing part of
    its requests flips on every third failure and first success (the soak's flaky provider:
    ~19,600 times an hour, each a WARNING); /metrics always has the current state."""
    if change not in ("healthy", "unhealthy"):
        return 0
    if now - state.flip_told_at < FLAP_WINDOW:
        state.flips_untold += 1
        return None
    untold, state.flips_untold, state.flip_told_at = state.flips_untold, 0, now
    return untold


def pick(
    members: Sequence[UpstreamState],
    balance: Balance,
    now: float,
    rand: Callable[[], float],
    tried: Collection[UpstreamState] = (),
) -> UpstreamState | None:
    """The member to try next, or None when no circuit lets a request through."""
    usable = [s for s in members if s.available(now)]
    if tried:
        usable = [s for s in usable if s not in tried] or usable
    if not usable:
        return None
    if len(usable) == 1:
        return usable[0]
    # Unhealthy members sit out while healthy ones exist, except to prove
    # themselves again: a circuit whose cooldown is over takes its probe, and
    # a member out of traffic for PROBE_EVERY seconds gets one request.
    healthy = [s for s in usable if s.healthy or s.breaker.state != "closed" or now - s.last_seen >= PROBE_EVERY]
    pool = healthy or usable
    best = min(s.target.priority for s in pool)
    tier = [s for s in pool if s.target.priority == best]
    if len(tier) == 1:
        return tier[0]
    if balance == "least_in_flight":
        return _lowest(tier, lambda s: s.in_flight / s.target.weight, rand)
    if balance == "latency":
        return _lowest(tier, lambda s: s.latency, rand)
    total = sum(s.target.weight * s.score for s in tier)
    point = rand() * total
    for s in tier:
        point -= s.target.weight * s.score
        if point < 0:
            return s
    return tier[-1]


def _lowest(
    tier: list[UpstreamState], key: Callable[[UpstreamState], float], rand: Callable[[], float]
) -> UpstreamState:
    low = min(key(s) for s in tier)
    ties = [s for s in tier if key(s) == low]
    return ties[min(int(rand() * len(ties)), len(ties) - 1)]


class Groups:
    """Every upstream state, kept across reloads: a member that is still in
    the new policy (same provider, name and address) keeps its circuit and
    health; only its thresholds follow the new policy."""

    def __init__(self) -> None:
        self.states: dict[tuple[str, str, str, int], UpstreamState] = {}
        self._groups: dict[tuple[str, str, int], tuple[Provider, list[UpstreamState]]] = {}

    def members(self, provider: Provider, host: str, port: int) -> list[UpstreamState]:
        """The provider's members; a member without its own URL uses ``host:port``."""
        key = (provider.name, host, port)
        group = self._groups.get(key)
        if group is not None and group[0] is provider:
            return group[1]
        states = []
        for t in provider.targets:
            up = t.upstream or provider.upstream
            h, p = (up.host, up.port) if up is not None else (host, port)
            state = self.states.get((provider.name, t.name, h, p))
            if state is None:
                state = self.states[(provider.name, t.name, h, p)] = UpstreamState(provider, t, h, p)
            else:
                state.target = t
                state.breaker.policy = provider.circuit
            states.append(state)
        self._groups[key] = (provider, states)
        return states

    def known(self, provider: Provider) -> list[UpstreamState]:
        """The provider's members as far as they can be named: with a fixed
        address, made if no request has used them yet; a member that goes to
        the CONNECT target, once per host seen in traffic."""
        if provider.upstream is not None or all(t.upstream for t in provider.targets):
            up = provider.upstream or provider.targets[0].upstream
            assert up is not None
            return self.members(provider, up.host, up.port)
        names = {t.name for t in provider.targets}
        return [s for (p, name, *_), s in self.states.items() if p == provider.name and name in names]

    def statistics(self) -> list[dict[str, object]]:
        return [{"provider": s.provider, **s.statistics()} for s in self.states.values()]

    def __repr__(self) -> str:
        return f"Groups({len(self.states)} upstreams)"
