"""The limiter arithmetic (addons/limits/arithmetic.py): exact edges, all-or-nothing, reconcile,
concurrency, bounded state, and hypothesis properties against a textbook GCRA in Fractions."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.limits.arithmetic import CONCURRENT_RETRY_AFTER, LocalLimiter, RuleState, Verdict, judge, share
from proxy.policy.rates import Rule

MINUTE60 = Rule("requests", 60, 60)


def take(limiter: LocalLimiter, checks: list[tuple[str, Rule]], n: int, now: float, tokens: int = 0) -> list[bool]:
    return [limiter.acquire(checks, tokens, now).allowed for _ in range(n)]


# -- rules ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rule", "name", "ticks"),
    [
        (Rule("requests", 60, 60), "requests-minute", 1_000_000),
        (Rule("requests", 10, 1), "requests-second", 1_000_000),
        (Rule("requests", 5000, 86400), "requests-day", 1_000_000),
        (Rule("tokens", 90_000, 60), "tokens-minute", 1_000_000),
        (Rule("tokens", 2_000_000, 86400), "tokens-day", 1_000),  # 2e6 * 8.64e10 us > 2**50
        (Rule("tokens", 10**10, 86400), "tokens-day", 1),
        (Rule("concurrent", 4), "concurrent", 0),
        (Rule("requests", 3, 0.25, "requests-burst"), "requests-burst", 1_000_000),
    ],
)
def test_rule_names_and_resolution(rule: Rule, name: str, ticks: int) -> None:
    assert (rule.name, rule.ticks) == (name, ticks)
    assert rule.cap < 2**51  # levels stay exact as doubles in the Redis script


@pytest.mark.parametrize(
    "kwargs",
    [
        {"kind": "bytes", "limit": 1, "period": 1},
        {"kind": "requests", "limit": 0, "period": 1},
        {"kind": "requests", "limit": 1.5, "period": 1},
        {"kind": "requests", "limit": True, "period": 1},
        {"kind": "requests", "limit": 1, "period": 0},
        {"kind": "requests", "limit": 1, "period": math.inf},
        {"kind": "requests", "limit": 1, "period": 7},  # unusual period, no name
        {"kind": "requests", "limit": 1, "period": 60, "name": "Requests:Minute"},
        {"kind": "concurrent", "limit": 1, "period": 60},
        {"kind": "tokens", "limit": 10**12, "period": 86400},
    ],
)
def test_bad_rules_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        Rule(**kwargs)  # type: ignore[arg-type]


# -- exact edges -----------------------------------------------------------------------------


def test_sixty_per_minute_at_the_edges() -> None:
    limiter, checks = LocalLimiter(), [("provider:openai", MINUTE60)]
    assert take(limiter, checks, 60, 0.0) == [True] * 60
    refused = limiter.acquire(checks, 0, 0.0)
    assert (refused.allowed, refused.retry_after, refused.refused_by) == (False, 1.0, "provider:openai requests-minute")
    assert refused.states == (RuleState("provider:openai", "requests-minute", 60, 0, 60.0),)
    late = limiter.acquire(checks, 0, 0.999999)
    assert not late.allowed and late.retry_after == pytest.approx(1e-6)
    assert limiter.acquire(checks, 0, 1.0).allowed  # exactly one emission interval later
    assert not limiter.acquire(checks, 0, 1.0).allowed
    assert take(limiter, checks, 4, 4.0) == [True, True, True, False]
    # A minute after the last grant the bucket is full: the whole burst again, never more.
    assert take(limiter, checks, 61, 64.0) == [True] * 60 + [False]


@pytest.mark.parametrize(
    ("kind", "limit", "period"),
    [("requests", 10, 1), ("requests", 60, 60), ("requests", 100, 3600), ("requests", 1000, 86400),
     ("tokens", 40_000, 60), ("tokens", 1_000_000, 86400), ("requests", 7, 60)],
)  # fmt: skip
def test_each_period_at_its_edges(kind: str, limit: int, period: float) -> None:
    rule = Rule(kind, limit, period)  # type: ignore[arg-type]
    limiter, checks = LocalLimiter(), [("s", rule)]
    chunk = 1 if kind == "requests" else limit // 10  # tokens: the quota in ten requests
    assert take(limiter, checks, limit // chunk, 100.0, chunk) == [True] * (limit // chunk)
    cost = 1  # then one more unit
    refused = limiter.acquire(checks, cost, 100.0)
    interval = Fraction(period) / limit
    assert refused.retry_after == pytest.approx(float(interval), rel=1e-12)
    # The next unit is due at 100 + period/limit, counted in whole ticks, rounded up.
    due = Fraction(100) + Fraction(math.ceil(interval * rule.ticks), rule.ticks)
    assert not limiter.acquire(checks, cost, float(due - Fraction(1, rule.ticks))).allowed
    assert limiter.acquire(checks, cost, float(due)).allowed
    assert not limiter.acquire(checks, cost, float(due)).allowed


def test_headers_report_floor_of_remaining_and_time_to_full() -> None:
    limiter, rule = LocalLimiter(), Rule("tokens", 1000, 60)
    verdict = limiter.acquire([("p", rule)], 250, 0.0)
    assert verdict.states == (RuleState("p", "tokens-minute", 1000, 750, 15.0),)
    later = limiter.acquire([("p", rule)], 0, 1.5)  # 25 tokens back: 775 left, 13.5 s to full
    assert later.states == (RuleState("p", "tokens-minute", 1000, 775, 13.5),)
    frac = limiter.acquire([("p", rule)], 0, 1.53)  # 25.5 more: remaining is floored
    assert frac.states[0].remaining == 775


# -- all-or-nothing --------------------------------------------------------------------------


def test_a_refusal_consumes_nothing_from_any_scope() -> None:
    limiter = LocalLimiter()
    provider = ("provider:openai", Rule("requests", 10, 60))
    caller = ("caller:openai/10.0.0.5", Rule("requests", 1, 60))
    slots = ("upstream:openai/key-a", Rule("concurrent", 5))
    tokens = ("provider:openai", Rule("tokens", 1000, 60))
    checks = [provider, tokens, slots, caller]
    assert limiter.acquire(checks, 100, 0.0).allowed
    refused = limiter.acquire(checks, 100, 0.0)
    assert not refused.allowed and refused.refused_by == "caller:openai/10.0.0.5 requests-minute"
    assert [s.remaining for s in refused.states] == [9, 900, 4, 0]  # as before the refused request
    assert limiter.statistics()["in_flight"] == 1
    # Nothing was taken: without the caller rule, exactly 9 more requests and 4 more slots fit.
    rest = [provider, tokens, slots]
    assert take(limiter, rest, 5, 0.0, 100) == [True, True, True, True, False]
    limiter.release(rest)
    assert take(limiter, [provider], 6, 0.0) == [True] * 5 + [False]


def test_retry_after_is_the_longest_refusing_wait() -> None:
    limiter = LocalLimiter()
    minute, hour = ("a", Rule("requests", 2, 60)), ("b", Rule("requests", 4, 3600))
    assert take(limiter, [minute, hour], 2, 0.0) == [True, True]
    assert take(limiter, [hour], 2, 0.0) == [True, True]
    verdict = limiter.acquire([minute, hour], 0, 0.0)
    assert (verdict.retry_after, verdict.refused_by) == (900.0, "b requests-hour")
    assert limiter.acquire([minute], 0, 0.0).retry_after == 30.0


def test_judge_is_the_whole_decision() -> None:
    rule = Rule("requests", 2, 1)
    assert judge([("s", rule)], [0], 0) == Verdict(True, 0.0, None, (RuleState("s", "requests-second", 2, 1, 0.5),))
    assert judge([("s", rule)], [rule.cap], 0).retry_after == 0.5


# -- tokens ----------------------------------------------------------------------------------


def test_token_reservation_and_reconcile_both_ways() -> None:
    limiter, rule = LocalLimiter(), Rule("tokens", 1000, 60)
    checks = [("provider:openai", rule), ("provider:openai", MINUTE60)]
    assert limiter.acquire(checks, 600, 0.0).allowed
    assert not limiter.acquire(checks, 600, 0.0).allowed  # 400 left
    limiter.reconcile(checks, -300, 0.0)  # used 300 of the 600 reserved
    assert limiter.acquire(checks, 600, 0.0).allowed  # 300 + 600 <= 1000
    limiter.reconcile(checks, +500, 0.0)  # used 1100 of 600: 400 tokens of debt
    debt = limiter.acquire(checks, 0, 0.0)
    assert not debt.allowed and debt.retry_after == 24.0  # 400 tokens at 1000/min
    assert debt.states[0].remaining == 0 and debt.states[1].remaining == 58  # requests untouched by reconcile
    assert limiter.acquire(checks, 0, 24.0).allowed


def test_returned_tokens_never_overfill_and_debt_is_one_window_at_most() -> None:
    limiter, rule = LocalLimiter(), Rule("tokens", 1000, 60)
    checks = [("p", rule)]
    limiter.acquire(checks, 100, 0.0)
    limiter.reconcile(checks, -5000, 0.0)
    assert take(limiter, checks, 2, 0.0, 1000) == [True, False]
    limiter.reconcile(checks, 10**9, 0.0)
    assert limiter.acquire(checks, 0, 0.0).retry_after == 60.0  # 2 * 1000 in use: a full window of debt


def test_a_cost_beyond_the_whole_quota_never_fits() -> None:
    limiter, rule = LocalLimiter(), Rule("tokens", 1000, 60)
    verdict = limiter.acquire([("p", rule), ("p", MINUTE60)], 1001, 0.0)
    assert not verdict.allowed and verdict.retry_after == math.inf and verdict.refused_by == "p tokens-minute"
    assert limiter.acquire([("p", rule)], 1000, 0.0).allowed


def test_tokens_must_not_be_negative() -> None:
    with pytest.raises(ValueError):
        LocalLimiter().acquire([("p", MINUTE60)], -1, 0.0)


# -- concurrency -----------------------------------------------------------------------------


def test_concurrency_acquire_and_release() -> None:
    limiter, checks = LocalLimiter(), [("upstream:openai/key-a", Rule("concurrent", 2))]
    first, second, third = (limiter.acquire(checks, 0, 0.0) for _ in range(3))
    assert first.allowed and second.allowed and second.states[0].remaining == 0
    assert (third.allowed, third.retry_after, third.refused_by) == (
        False, CONCURRENT_RETRY_AFTER, "upstream:openai/key-a concurrent")  # fmt: skip
    limiter.release(checks)
    assert limiter.acquire(checks, 0, 0.0).allowed
    for _ in range(5):
        limiter.release(checks)  # more releases than acquires: never below zero
    assert limiter.statistics()["in_flight"] == 0
    assert take(limiter, checks, 3, 0.0) == [True, True, False]


# -- reload ----------------------------------------------------------------------------------


def test_a_changed_rule_keeps_what_is_in_use() -> None:
    limiter = LocalLimiter()
    assert take(limiter, [("p", Rule("requests", 10, 60))], 10, 0.0) == [True] * 10
    assert take(limiter, [("p", Rule("requests", 15, 60))], 6, 0.0) == [True] * 5 + [False]
    # Same name, another period and resolution: still 15 in use, now draining at 15 per hour.
    wide = Rule("requests", 15, 3600, "requests-minute")
    assert not limiter.acquire([("p", wide)], 0, 0.0).allowed
    assert limiter.acquire([("p", wide)], 0, 240.0).allowed


# -- bounded state ---------------------------------------------------------------------------


def test_state_is_bounded_and_idle_state_goes_first() -> None:
    limiter = LocalLimiter(max_keys=100)
    busy = Rule("requests", 100_000, 86400)
    hot = [("provider:openai", busy), ("provider:openai", Rule("concurrent", 10**6))]
    caller = Rule("requests", 1, 1)
    for i in range(10_000):  # ten new callers a second, each idle (a full bucket) a second later
        verdict = limiter.acquire([*hot, (f"caller:openai/10.0.{i // 256}.{i % 256}", caller)], 0, i / 10)
        assert verdict.allowed and limiter.statistics()["keys"] <= 100
    stats = limiter.statistics()
    assert stats["in_flight"] == 10_000 and stats["swept"] > 9800
    assert stats["evicted"] == 0  # nothing had to be forgotten: idle buckets went first
    # The hot provider bucket survived every sweep: all 10_000 requests are still counted.
    used = 10_000 - Fraction(1000 * busy.limit, 86400) + 1
    assert limiter.acquire(hot[:1], 0, 1000.0).states[0].remaining == math.floor(busy.limit - used)


def test_eviction_under_pressure_keeps_leases_in_flight() -> None:
    limiter = LocalLimiter(max_keys=40)
    day, slot = Rule("requests", 1, 86400), Rule("concurrent", 1)
    assert limiter.acquire([("held", slot)], 0, 0.0).allowed
    for i in range(1000):  # buckets that stay busy for a day: the cap must forget some
        limiter.acquire([(f"caller:{i}", day)], 0, float(i))
    stats = limiter.statistics()
    assert stats["keys"] <= 40 and stats["evicted"] > 900 and stats["in_flight"] == 1
    assert not limiter.acquire([("held", slot)], 0, 1000.0).allowed  # the lease was never dropped
    assert repr(limiter).startswith("LocalLimiter(keys=")


def test_statistics_and_repr() -> None:
    limiter, checks = LocalLimiter(), [("p", Rule("requests", 1, 1))]
    take(limiter, checks, 2, 0.0)
    assert limiter.statistics() == {"keys": 1, "in_flight": 0, "allowed": 1, "refused": 1, "swept": 0, "evicted": 0}
    assert repr(limiter) == "LocalLimiter(keys=1, in_flight=0, allowed=1, refused=1, evicted=0)"


# -- properties --------------------------------------------------------------------------------


class ReferenceGCRA:
    """The textbook GCRA over exact Fractions, one theoretical arrival time (TAT) per rule:
    a cost c at t conforms iff max(TAT, t) + c*T/L - t <= T (burst tolerance T - T/L: L at once)."""

    def __init__(self, rules: list[Rule]) -> None:
        self.rules = rules
        self.periods = [Fraction(r.span, r.ticks) for r in rules]  # the period in whole ticks
        self.tat = [Fraction(0)] * len(rules)

    def costs(self, tokens: int) -> list[int]:
        return [tokens if r.kind == "tokens" else 1 for r in self.rules]

    def edge(self, tokens: int) -> Fraction:
        """The first instant a request of ``tokens`` conforms."""
        costs = self.costs(tokens)
        return max(
            tat + c * p / r.limit - p for tat, c, p, r in zip(self.tat, costs, self.periods, self.rules, strict=True)
        )

    def acquire(self, tokens: int, t: Fraction) -> tuple[bool, float, list[int]]:
        """(allowed, retry_after, remaining per rule)"""
        now = [max(tat, t) for tat in self.tat]
        new = [
            n + c * p / r.limit for n, c, p, r in zip(now, self.costs(tokens), self.periods, self.rules, strict=True)
        ]
        wait = max(n - t - p for n, p in zip(new, self.periods, strict=True))
        allowed = wait <= 0
        if allowed:
            self.tat = new
        held = self.tat if allowed else now
        remaining = [
            max(0, math.floor((t + p - h) * r.limit / p))
            for h, p, r in zip(held, self.periods, self.rules, strict=True)
        ]
        return allowed, float(max(wait, Fraction(0))), remaining

    def reconcile(self, delta: int, t: Fraction) -> None:
        for i, (r, p) in enumerate(zip(self.rules, self.periods, strict=True)):
            if r.kind == "tokens":
                moved = max(self.tat[i], t) + delta * p / r.limit
                self.tat[i] = min(max(moved, t), t + 2 * p)


# Periods exact in microseconds (a rule's period is counted in whole ticks).
PERIODS = st.sampled_from([Fraction(1), Fraction(60), Fraction(1, 4), Fraction(2_333_333, 10**6), Fraction(3600)])
# When the next request arrives: an int is a gap in microseconds (0: at once); a tuple is
# ("edge", n): n microseconds after the first instant the request could be granted (computed
# from the model, exact), so that arrivals land on, just before and just after every edge.
ARRIVALS = st.one_of(
    st.integers(0, 3_000_000), st.tuples(st.just("edge"), st.integers(-3, 3) | st.integers(-2000, 2000))
)
Arrival = int | tuple[str, int]


def next_us(us: int, arrival: Arrival, edge: Fraction) -> int:
    if isinstance(arrival, int):
        return us + arrival
    return max(us, math.ceil(edge * 10**6) + arrival[1])


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 30),
    tokens=st.integers(1, 300),
    period=PERIODS,
    steps=st.lists(st.tuples(ARRIVALS, st.integers(0, 40), st.integers(-40, 40)), min_size=1, max_size=80),
)
def test_same_decisions_as_textbook_gcra(
    limit: int, tokens: int, period: Fraction, steps: list[tuple[Arrival, int, int]]
) -> None:
    """Requests and tokens rules together, with reconciles in both directions: the limiter grants
    exactly what the Fraction GCRA grants (never more, and never refuses when it has room), with
    the same Retry-After and remaining counts."""
    rules = [Rule("requests", limit, float(period), "r"), Rule("tokens", tokens, float(period), "t")]
    limiter, ref, us = LocalLimiter(), ReferenceGCRA(rules), 0
    checks = [("s", rule) for rule in rules]
    for arrival, cost, delta in steps:
        us = next_us(us, arrival, ref.edge(cost))
        t = Fraction(us, 10**6)
        verdict = limiter.acquire(checks, cost, us / 1e6)
        allowed, wait, remaining = ref.acquire(cost, t)
        assert verdict.allowed == allowed
        assert [s.remaining for s in verdict.states] == remaining
        if cost > tokens:
            assert verdict.retry_after == math.inf
        else:
            assert verdict.retry_after == pytest.approx(wait, rel=1e-9, abs=1e-9)
        if allowed and delta:
            limiter.reconcile(checks, delta, us / 1e6)
            ref.reconcile(delta, t)


@settings(max_examples=300, deadline=None)
@given(
    limit=st.integers(1, 20),
    period=PERIODS,
    arrivals=st.lists(st.tuples(ARRIVALS, st.integers(0, 25)), min_size=1, max_size=80),
)
def test_never_over_grants_in_any_window(limit: int, period: Fraction, arrivals: list[tuple[Arrival, int]]) -> None:
    """The exact GCRA bound with burst = limit L over period T: whatever granted in a closed window
    [t1, t2] (t1, t2 grant times) costs at most L + (t2 - t1) * L / T. Why: after a grant at t2,
    TAT <= t2 + T; and TAT >= t1 + (costs granted in [t1, t2]) * T/L, since the TAT is at least t1
    when the first of them arrives and each grant moves it by cost * T/L. So one window of length T
    may hold 2L (L at its start, L more refilled by its end) but a short window never much above L,
    unlike a fixed window's 2L across its edge; the bound is tight (a burst, then one per T/L).
    Conversely a refusal happens only when granting would break that bound for some window ending
    now, or the cost alone exceeds L: the limiter never refuses while the bucket has room."""
    rule = Rule("tokens", limit, float(period), "t")
    limiter, us = LocalLimiter(), 0
    granted: list[tuple[Fraction, int]] = []

    def edge(cost: int) -> Fraction:
        """The first instant at which ``cost`` more keeps every window within the bound."""
        first, total = Fraction(0), Fraction(cost)
        for tk, ck in reversed(granted):
            total += ck
            first = max(first, tk + (total - limit) * period / limit)
        return first

    def worst_window(t: Fraction, cost: int) -> Fraction:
        """max over earlier grants k of (cost granted in [t_k, t], plus ``cost``) - the bound."""
        worst, total = Fraction(-limit), Fraction(cost)
        for tk, ck in reversed(granted):
            total += ck
            worst = max(worst, total - limit - (t - tk) * limit / period)
        return worst

    for arrival, cost in arrivals:
        us = next_us(us, arrival, edge(cost))
        t = Fraction(us, 10**6)
        allowed = limiter.acquire([("s", rule)], cost, us / 1e6).allowed
        if allowed:
            assert cost <= limit and worst_window(t, cost) <= 0
            granted.append((t, cost))
        else:
            assert cost > limit or worst_window(t, cost) > 0


class JudgedLimiter:
    """The limiter as its docstring states it, unfused: drain every rule, ask ``judge``, and
    only when allowed add each rule's cost. ``LocalLimiter.take`` must decide exactly this."""

    def __init__(self) -> None:
        self.level: dict[tuple[str, str], int] = {}
        self.at: dict[tuple[str, str], int] = {}

    def drained(self, scope: str, rule: Rule, now: float) -> int:
        key, level = (scope, rule.name), self.level.get((scope, rule.name), 0)
        if rule.span:
            tick = int(now * rule.ticks + 0.5)
            if tick > self.at.get(key, 0):
                level = max(0, level - (tick - self.at.get(key, 0)) * rule.limit)
                self.at[key] = tick
        self.level[key] = level
        return level

    def acquire(self, checks: list[tuple[str, Rule]], tokens: int, now: float) -> Verdict:
        verdict = judge(checks, [self.drained(scope, rule, now) for scope, rule in checks], tokens)
        if verdict.allowed:
            for scope, rule in checks:
                self.level[(scope, rule.name)] += (tokens if rule.kind == "tokens" else 1) * (rule.span or 1)
        return verdict

    def release(self, checks: list[tuple[str, Rule]]) -> None:
        for scope, rule in checks:
            if not rule.span and self.level.get((scope, rule.name), 0) > 0:
                self.level[(scope, rule.name)] -= 1


SHARED = Rule("requests", 5, 1)
RULE_SETS = [
    [("p", Rule("requests", 4, 1)), ("p", Rule("tokens", 50, 60)), ("c", Rule("concurrent", 3))],
    [("c", Rule("concurrent", 2)), ("p", Rule("requests", 3, 2, "r2"))],
    [("p", Rule("tokens", 30, 1)), ("q", SHARED)],
    [("q", SHARED), ("p", Rule("requests", 100, 60))],  # shares a state with the set above
]


@settings(max_examples=300, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.sampled_from(range(len(RULE_SETS))), st.integers(0, 40), st.integers(0, 400_000), st.booleans()),
        min_size=1,
        max_size=60,
    )
)
def test_fused_take_decides_exactly_as_judge(steps: list[tuple[int, int, int, bool]]) -> None:
    """Mixed rate and concurrency rules over overlapping check sets, through bound checks (the
    request path) and plain ones: the same verdicts, Retry-After, refusing rule and states as
    drain-then-judge, refusals consume nothing, and the remaining counts ``take`` returns match."""
    limiter, ref, us = LocalLimiter(), JudgedLimiter(), 0
    bound = [limiter.bind(checks) for checks in RULE_SETS]
    for which, tokens, gap, release in steps:
        us += gap
        now, checks = us / 1e6, RULE_SETS[which]
        expected = ref.acquire(checks, tokens, now)
        if which % 2:  # the request path: a bound check, then the full verdict only when refused
            left = limiter.take(bound[which], tokens, now)
            assert (left is not None) == expected.allowed
            if left is None:
                assert limiter.acquire(checks, tokens, now) == expected
            else:
                assert left == [s.remaining for s in expected.states]
        else:
            assert limiter.acquire(checks, tokens, now) == expected
        if release and expected.allowed:
            limiter.release(checks)
            ref.release(checks)


def test_bound_checks_follow_states_dropped_and_rules_reloaded() -> None:
    limiter = LocalLimiter(max_keys=4)
    checks = [("provider:a", Rule("requests", 2, 60))]
    bound = limiter.bind(checks)
    assert limiter.take(bound, 0, 0.0) == [1]
    for i in range(8):  # other scopes crowd the limiter: the idle-or-oldest sweep drops states
        limiter.acquire([(f"caller:{i}", Rule("requests", 1, 86400))], 0, 1000.0 + i)
    assert limiter.statistics()["swept"] + limiter.statistics()["evicted"] > 0
    # The bound check looks its state up again rather than counting into a dropped one.
    assert limiter.take(bound, 0, 2000.0) == [1]
    assert limiter.acquire(checks, 0, 2000.0).states[0].remaining == 0
    # A reloaded rule of the same name, through an old bound: adopted, the amount in use kept.
    wider = [("provider:a", Rule("requests", 10, 60))]
    assert limiter.take(limiter.bind(wider), 0, 2000.0) == [7]
    assert limiter.take(bound, 0, 2000.0) is None  # the old rule again: 2/min, all in use


@pytest.mark.parametrize(
    ("rule", "sidecars", "limit"),
    [
        (Rule("requests", 30, 60.0), 1, 30),  # alone: the whole limit (the same rule)
        (Rule("requests", 30, 60.0), 3, 10),
        (Rule("requests", 30, 60.0), 4, 7),  # rounded down: together at most the limit
        (Rule("requests", 2, 60.0), 3, 1),  # at least one per window, whatever the count
        (Rule("tokens", 100_000, 60.0), 3, 33_333),
        (Rule("concurrent", 8), 3, 2),
        (Rule("requests", 30, 60.0), 0, 30),  # no count yet: as alone
    ],
)
def test_a_sidecars_share_of_a_rule(rule: Rule, sidecars: int, limit: int) -> None:
    part = share(rule, sidecars)
    assert (part.kind, part.limit, part.period, part.name) == (rule.kind, limit, rule.period, rule.name)
    if sidecars <= 1:
        assert part is rule  # the local states keep their rule: no rescaling
    limiter = LocalLimiter()  # the share is what one process then admits in a window
    admitted = sum(limiter.acquire([("provider:p", part)], 1, 0.0).allowed for _ in range(limit + 5))
    assert admitted == limit
