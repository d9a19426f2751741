"""Rate and concurrency limits: the arithmetic. Pure: no asyncio, no I/O, ``now`` passed in.

A scope (``"provider:openai"``, ``"upstream:openai/key-a"``, ``"caller:openai/10.0.0.5"``)
has rules; a *check* is a sequence of ``(scope, Rule)`` pairs, judged all-or-nothing::

    limiter = LocalLimiter()                        # or RedisLimiter (addons/limits/redis_limiter.py), same calls
    verdict = limiter.acquire(checks, tokens=estimate, now=clock())
    if not verdict.allowed:                         # nothing was consumed from any rule
        ... 429, Retry-After: ceil(verdict.retry_after); inf means the cost can never fit (413)
    ... forward; verdict.states feed x-ratelimit-{limit,remaining}-<rule name> ...
    limiter.reconcile(checks, actual - estimate, now=clock())   # token rules only; may be negative
    limiter.release(checks)                                     # concurrency slots

API:
    Rule(kind, limit, period=0.0, name="")   kind: "requests" | "tokens" | "concurrent"; name
                                             defaults to "<kind>-<second|minute|hour|day>" / "concurrent"
    judge(checks, levels, tokens) -> Verdict the decision, given each rule's current level
    Verdict(allowed, retry_after, refused_by, states, lease)
    RuleState(scope, name, limit, remaining, reset)          one per rule checked, for headers
    LocalLimiter(max_keys=100_000)
        .acquire(checks, tokens, now) -> Verdict
        .bind(checks) -> Bound            checks made on every request, states looked up once
        .take(bound, tokens, now) -> list[int] | None   acquire without objects: the
                                          remaining per rule, or None (then acquire says why)
        .reconcile(checks | bound, token_delta, now) -> None
        .release(checks) -> bool          True when it returned a concurrency slot
        .statistics() -> dict

Rates are GCRA (a token bucket kept as one number) with burst = the whole quota: "60 per minute"
lets 60 through at once, then one per second. State per rule is ``level``, the amount in use,
kept in *level units* = cost x ticks, and ``at``, the tick it was last brought up to date.
A tick is 1 us, or 1 ms / 1 s when ``limit * period`` is too large for 1 us: every number then
stays below 2**53, so the arithmetic is exact integers here and in Redis's Lua (doubles), and
both sides decide identically. A request of cost c at tick ``now``:

    level' = max(0, level - (now - at) * limit)       drain: ``limit`` level units per tick
    allowed  iff  level' + c * span <= limit * span    span = period in ticks; the right side is ``cap``
    retry_after = (level' + c * span - cap) / limit ticks;  reset = level' / limit ticks (until full)

``level / limit`` is GCRA's TAT - now. The bound it gives (tested as a property): for granted
arrivals at t1 <= t2, the costs granted in [t1, t2] sum to at most limit + (t2 - t1) * limit / period.
Reconcile adds (or returns) ``delta * span``, clamped to [0, 2 * cap]: at most one window of debt.

Concurrency rules count leases in flight; acquire takes one, release returns it. A refusal by a
concurrency rule has no known end, so it reports CONCURRENT_RETRY_AFTER.

Fine print: ``now`` (seconds) is rounded to the nearest tick and a period to whole ticks. A check
names each (scope, rule name) once. A reloaded rule with the same name keeps the amount in use
(raise a limit and the headroom grows at once); a name is not reused for another kind.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.policy.rates import Rule

CONCURRENT_RETRY_AFTER = 1.0  # seconds; a concurrency slot frees at no predictable time


Check = tuple[str, Rule]


def share(rule: Rule, sidecars: int) -> Rule:
    """One process's part of a rule that ``sidecars`` processes share, for while they cannot
    count together (Redis out of reach): ``limit // sidecars``, at least one per window, so
    all of them together admit at most the limit plus one unit each."""
    if sidecars <= 1:
        return rule
    return Rule(rule.kind, max(1, rule.limit // sidecars), rule.period, rule.name)


# The two results are built on every request: slotted but not frozen, because a frozen
# dataclass's __init__ (object.__setattr__ per field) costs about 5x more. Treat them as read-only.


@dataclass(slots=True)
class RuleState:
    """One rule after a check, for response headers."""

    scope: str
    name: str
    limit: int
    remaining: int  # whole units left (after this request when allowed), >= 0
    reset: float  # seconds until the bucket is full again; 0 for concurrency


@dataclass(slots=True)
class Verdict:
    allowed: bool
    retry_after: float  # seconds; 0 when allowed; inf when the cost exceeds a rule's whole limit
    refused_by: str | None  # "<scope> <rule name>" of the refusing rule with the longest wait
    states: tuple[RuleState, ...]
    lease: str | None = None  # RedisLimiter: the id of the concurrency leases taken


def cost_of(rule: Rule, tokens: int) -> int:
    """Level units one acquire adds to a rate rule."""
    return (tokens if rule.kind == "tokens" else 1) * rule.span


def judge(checks: Sequence[Check], levels: Sequence[int], tokens: int, lease: str | None = None) -> Verdict:
    """The all-or-nothing decision. ``levels[i]``: rule i's level drained to now (rates) or its
    leases in flight (concurrency). Both limiters call this; the Redis script decides the same."""
    states: list[RuleState] = []
    for (scope, rule), level in zip(checks, levels, strict=True):
        if rule.kind == "concurrent":
            if level >= rule.limit:
                return _refusal(checks, levels, tokens)
            states.append(RuleState(scope, rule.name, rule.limit, rule.limit - level - 1, 0.0))
        else:
            new = level + cost_of(rule, tokens)
            if new > rule.cap:
                return _refusal(checks, levels, tokens)
            states.append(RuleState(scope, rule.name, rule.limit, (rule.cap - new) // rule.span, _seconds(rule, new)))
    return Verdict(True, 0.0, None, tuple(states), lease)


def _seconds(rule: Rule, level: int) -> float:
    return level / (rule.limit * rule.ticks)


def _refusal(checks: Sequence[Check], levels: Sequence[int], tokens: int) -> Verdict:
    wait, worst = 0.0, ""
    states: list[RuleState] = []
    for (scope, rule), level in zip(checks, levels, strict=True):
        delay = 0.0
        if rule.kind == "concurrent":
            if level >= rule.limit:
                delay = CONCURRENT_RETRY_AFTER
            states.append(RuleState(scope, rule.name, rule.limit, max(0, rule.limit - level), 0.0))
        else:
            cost = cost_of(rule, tokens)
            if cost > rule.cap:
                delay = math.inf  # more than the whole quota: no wait makes it fit
            elif level + cost > rule.cap:
                delay = _seconds(rule, level + cost - rule.cap)
            states.append(RuleState(scope, rule.name, rule.limit, max(0, (rule.cap - level) // rule.span),
                                    _seconds(rule, level)))  # fmt: skip
        if delay > wait:
            wait, worst = delay, f"{scope} {rule.name}"
    return Verdict(False, wait, worst, tuple(states))


class _State:
    """One (scope, rule name): a rate's level and tick, or a concurrency's count in ``level``."""

    __slots__ = ("rule", "level", "at")

    def __init__(self, rule: Rule) -> None:
        self.rule, self.level, self.at = rule, 0, 0

    def drain(self, rule: Rule, now: float) -> int:
        """Bring the level up to ``now`` (lossless: the state means the same) and return it."""
        if rule is not self.rule:
            self.adopt(rule)
        if rule.kind == "concurrent":
            return self.level
        tick = int(now * rule.ticks + 0.5)
        if tick > self.at:
            self.level = max(0, self.level - (tick - self.at) * rule.limit)
            self.at = tick
        return self.level

    def adopt(self, rule: Rule) -> None:
        """The policy was reloaded: keep the amount in use, in the new rule's units."""
        old, self.rule = self.rule, rule
        if old.kind != rule.kind:
            self.level = self.at = 0
        elif rule.kind != "concurrent":
            self.level = -(-self.level * rule.span // old.span)  # rounded up: never forgets use
            self.at = self.at * rule.ticks // old.ticks


class Bound:
    """Checks with their states looked up once (``LocalLimiter.bind``): ``take`` looks nothing up
    while the limiter drops no state; after it did (``generation``), they are looked up again."""

    __slots__ = ("checks", "states", "generation")

    def __init__(self, checks: tuple[Check, ...]) -> None:
        self.checks = checks
        self.states: tuple[tuple[_State, Rule], ...] = ()
        self.generation = -1


class LocalLimiter:
    """Per-process limits. State per (scope, rule name), bounded by ``max_keys``: past it, states
    equivalent to none (a full bucket, no leases) are dropped first, then the least recently used
    rate states (counted as ``evicted``: a lossy forget). Leases in flight are never dropped."""

    __slots__ = ("max_keys", "_states", "_generation", "_in_flight", "_allowed", "_refused", "_swept", "_evicted")

    def __init__(self, max_keys: int = 100_000) -> None:
        if max_keys < 4:
            raise ValueError("max_keys must be at least 4")
        self.max_keys = max_keys
        self._states: dict[tuple[str, str], _State] = {}
        self._generation = 0  # counts drops of states: a Bound looked up before one is stale
        self._in_flight = self._allowed = self._refused = self._swept = self._evicted = 0

    def acquire(self, checks: Sequence[Check], tokens: int, now: float) -> Verdict:
        bound = self.bind(checks)
        left = self.take(bound, tokens, now)
        if left is None:
            self._refused += 1
            return judge(checks, [st.drain(rule, now) for st, rule in bound.states], tokens)
        states = []
        for (scope, rule), (st, _), remaining in zip(checks, bound.states, left, strict=True):
            reset = _seconds(rule, st.level) if rule.span else 0.0
            states.append(RuleState(scope, rule.name, rule.limit, remaining, reset))
        return Verdict(True, 0.0, None, tuple(states))

    def bind(self, checks: Sequence[Check]) -> Bound:
        """``checks`` for ``take``; keep it for checks made again and again (a provider's)."""
        return Bound(tuple(checks))

    def take(self, bound: Bound, tokens: int, now: float) -> list[int] | None:
        """``acquire``'s allowed case without its objects, for the request path: each rule's
        remaining units after this request, or None when refused (nothing taken, nothing
        counted; ``acquire`` says why and for how long). ``judge`` fused with the state
        updates; ``judge`` stays the spec and a property test holds the two equal."""
        if tokens < 0:
            raise ValueError("tokens must be >= 0")
        if bound.generation != self._generation:
            self._look_up(bound, now)
        left: list[int] = []
        # Each rule is taken as it is judged (no second pass): rare refusals hand back the
        # rules before them.
        for st, rule in bound.states:
            if st.rule is not rule:  # the policy was reloaded
                st.adopt(rule)
            span = rule.span
            if span:  # a rate: drain to now, then add the cost
                tick = int(now * rule.ticks + 0.5)
                level = st.level
                if tick > st.at:
                    level -= (tick - st.at) * rule.limit
                    if level < 0:
                        level = 0
                    st.level, st.at = level, tick  # lossless: kept even when refused
                level += tokens * span if rule.kind == "tokens" else span
                if level > rule.cap:
                    self._give_back(bound.states[: len(left)], tokens)
                    return None
                st.level = level
                left.append((rule.cap - level) // span)
            else:  # concurrency: one more lease in flight
                if st.level >= rule.limit:
                    self._give_back(bound.states[: len(left)], tokens)
                    return None
                st.level += 1
                self._in_flight += 1
                left.append(rule.limit - st.level)
        self._allowed += 1
        return left

    def _look_up(self, bound: Bound, now: float) -> None:
        """The only place states are made (so the only place to make room): before the lookup,
        so none is dropped while a take holds it."""
        if len(self._states) + len(bound.checks) > self.max_keys:
            self._shrink(now)
        states = self._states
        found = []
        for scope, rule in bound.checks:
            st = states.get((scope, rule.name))
            if st is None:
                st = states[(scope, rule.name)] = _State(rule)
            found.append((st, rule))
        bound.states, bound.generation = tuple(found), self._generation

    def _give_back(self, taken: Sequence[tuple[_State, Rule]], tokens: int) -> None:
        for st, rule in taken:
            if rule.span:
                st.level -= cost_of(rule, tokens)
            else:
                st.level -= 1
                self._in_flight -= 1

    def reconcile(self, checks: Sequence[Check] | Bound, token_delta: int, now: float) -> None:
        """Correct the token rules by ``actual - reserved`` (negative returns tokens)."""
        if not token_delta:
            return
        bound = checks if isinstance(checks, Bound) else self.bind(checks)
        if bound.generation != self._generation:
            self._look_up(bound, now)
        for st, rule in bound.states:
            if rule.kind == "tokens":
                level = st.drain(rule, now) + token_delta * rule.span
                st.level = 0 if level < 0 else min(level, 2 * rule.cap)

    def release(self, checks: Sequence[Check]) -> bool:
        """Return the concurrency slots an allowed acquire took; True when there were any."""
        freed = False
        for scope, rule in checks:
            if not rule.span:
                st = self._states.get((scope, rule.name))
                if st is not None and st.level > 0:
                    st.level -= 1
                    self._in_flight -= 1
                    freed = True
        return freed

    def _shrink(self, now: float) -> None:
        """Drop idle states; if that frees too little, forget the least recently used rate
        states (by the tick each was last brought up to) down to 3/4 of ``max_keys``, so this
        O(n log n) sweep runs at most every max_keys/4 inserts."""
        self._generation += 1
        idle = [key for key, st in self._states.items() if st.drain(st.rule, now) == 0]
        for key in idle:
            del self._states[key]
        self._swept += len(idle)
        excess = len(self._states) - self.max_keys * 3 // 4
        if excess <= 0:
            return
        rates = [(st.at / st.rule.ticks, key) for key, st in self._states.items() if st.rule.span]
        for _, key in heapq.nsmallest(excess, rates):
            del self._states[key]
        self._evicted += min(excess, len(rates))

    def statistics(self) -> dict[str, int]:
        return {"keys": len(self._states), "in_flight": self._in_flight, "allowed": self._allowed,
                "refused": self._refused, "swept": self._swept, "evicted": self._evicted}  # fmt: skip

    def __repr__(self) -> str:
        return (f"LocalLimiter(keys={len(self._states)}, in_flight={self._in_flight}, "
                f"allowed={self._allowed}, refused={self._refused}, evicted={self._evicted})")  # fmt: skip
