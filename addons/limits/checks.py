"""What the limits addon takes for a request and holds until it ends: the (scope, rule)
pairs of a provider and caller made once (``Checks``), what one flow holds (``Taken``), and
how a verdict reads (``remaining_of``, ``by_concurrency``, ``over_limit``). No I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from addons.limits.arithmetic import Bound, Check, LocalLimiter, Verdict
from addons.limits.redis_limiter import RedisLimiter
from proxy import errors
from proxy.policy import Provider


@dataclass(frozen=True, slots=True)
class Checks:
    """A request's (scope, rule) pairs and what the request path derives from them, made once
    per provider and caller: each answer then costs no string formatting and no rule scans."""

    pairs: tuple[Check, ...]
    headers: tuple[tuple[str, str, str], ...] = ()  # per pair: limit header, its value, remaining header
    local: LocalLimiter | None = None  # given: the pairs are bound to its states
    token_pairs: tuple[Check, ...] = field(init=False)  # what a reconcile corrects
    has_slots: bool = field(init=False)  # a concurrency rule: a lease to hand back
    bound: Bound | None = field(init=False)
    tokenless: Checks | None = field(init=False, default=None)  # the others, for bodyless requests

    def __post_init__(self) -> None:
        tokens = tuple(c for c in self.pairs if c[1].kind == "tokens")
        object.__setattr__(self, "token_pairs", tokens)
        object.__setattr__(self, "has_slots", any(rule.kind == "concurrent" for _, rule in self.pairs))
        object.__setattr__(self, "bound", self.local.bind(self.pairs) if self.local else None)

    @classmethod
    def for_requests(cls, pairs: tuple[Check, ...], local: LocalLimiter) -> Checks:
        headers = tuple((f"x-ratelimit-limit-{r.name}", str(r.limit), f"x-ratelimit-remaining-{r.name}")
                        for _, r in pairs)  # fmt: skip
        checks = cls(pairs, headers, local)
        rest = tuple(pair for pair in pairs if pair[1].kind != "tokens")
        if checks.token_pairs and rest:
            object.__setattr__(checks, "tokenless", cls.for_requests(rest, local))
        return checks


@dataclass(slots=True)
class Taken:
    """What one flow holds: released or reconciled when it ends."""

    checks: Checks
    tokens: int
    limiter: LocalLimiter | RedisLimiter
    lease: str | None = None
    remaining: Sequence[int] = ()  # per check, for the x-ratelimit-* headers


def remaining_of(verdict: Verdict) -> tuple[int, ...]:
    return tuple(state.remaining for state in verdict.states)


def by_concurrency(verdict: Verdict) -> bool:
    return (verdict.refused_by or "").endswith(" concurrent")


def over_limit(provider: Provider, verdict: Verdict, tokens: int) -> errors.RequestOverLimit:
    """The refusal for a cost no window can hold, naming the rule (never a value of the request)."""
    scope, _, rule = (verdict.refused_by or "provider -").partition(" ")
    limit = next((s.limit for s in verdict.states if s.name == rule and s.scope == scope), 0)
    return errors.RequestOverLimit(provider.name, scope=scope.split(":", 1)[0], rule=rule, limit=limit, reserved=tokens)
