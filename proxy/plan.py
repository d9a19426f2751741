"""The attempt planner: which member to send to next, whether to wait, fail
over or stop. Sans-IO (httpcore's decide-then-I/O): it is fed what the last
step came to and ``now``, and answers with a verdict the forwarder carries
out (``proxy.attempt_loop``); nothing here sends, sleeps or reads a clock.

    plan.next(outcome, now) -> Send | Sleep | Failover | Finish

Outcomes: ``None`` (start, after a sleep or a failover), ``Answered`` (a
response with a status the policy retries), ``Failed`` (an error code),
``HeldOff`` (the member's own limits are spent for a while: another member,
no attempt used), ``OverLimit`` (the member's own limits can never take this
request: skipped for this request only).

The decisions are made by the pure cores it composes: ``retry.decide`` (retry
or not, how long), ``balance.pick`` (which member), ``failover.rewrite``
(what a fallback request looks like). The forwarder builds a plan only once a
request needs one (a first attempt that did not serve): the common request,
its first member answering (a pool's pick included), never makes one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from proxy import balance, errors, failover, retry
from proxy.balance import Groups, UpstreamState
from proxy.policy import Policy, Provider, RetryPolicy, Target


@dataclass(slots=True)
class Route:
    """The provider the attempts currently go to: the matched one, then fallbacks."""

    provider: Provider
    policy: RetryPolicy
    url: str | None  # the matched provider's URL for members without their own (addons may rewrite it)
    host: str  # where members without their own URL go
    port: int
    path: str = ""  # fallbacks: the rewritten origin-form path
    body: bytes | None = None  # fallbacks: the rewritten body, when the model changed
    next_fallback: int = 0


# -- outcomes ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Answered:
    member: UpstreamState
    status: int
    asked_delay: float | None = None  # what Retry-After and friends asked for


@dataclass(frozen=True, slots=True)
class Failed:
    member: UpstreamState
    code: str


@dataclass(frozen=True, slots=True)
class HeldOff:
    member: UpstreamState
    seconds: float


@dataclass(frozen=True, slots=True)
class OverLimit:
    member: UpstreamState
    error: errors.RequestOverLimit


Outcome = Answered | Failed | HeldOff | OverLimit


# -- verdicts ----------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Send:
    member: UpstreamState
    number: int  # the attempt's number within the request, from 1


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Failover:
    route: Route  # already current: the next Send goes there


@dataclass(frozen=True, slots=True)
class Finish:
    """Stop. ``error`` None: the last outcome is the answer (a response is
    returned, an error raised); else raise ``error``."""

    error: errors.ProxyError | None = None
    served: bool = False  # the last outcome was a success


Verdict = Send | Sleep | Failover | Finish


class Plan:
    __slots__ = ("matched", "route", "groups", "policy", "method", "replayable", "start", "usable", "rand",
                 "path", "body", "attempts", "here", "tried", "unfit", "over_limit", "last", "decision")  # fmt: skip

    def __init__(
        self, route: Route, groups: Groups, policy: Policy, *, method: str, replayable: bool, start: float,
        usable: Callable[[Provider, Target], bool], rand: Callable[[], float], path: str, body: object,
        attempts: int = 0,
    ) -> None:  # fmt: skip
        self.matched = route.provider
        self.route = route
        self.groups = groups
        self.policy = policy  # the flow's snapshot: fallbacks are looked up in it
        self.method = method
        self.replayable = replayable  # a streamed body is gone once sent
        self.start = start  # monotonic time the request arrived: the deadline counts from it
        self.usable = usable  # whether a member's credential is present
        self.rand = rand
        self.path = path  # the request's path and body as the matched provider gets them
        self.body = body
        self.attempts = attempts  # sent so far (the forwarder may have sent the first without a plan)
        self.here = attempts  # of them, to the current route
        self.tried: list[UpstreamState] = []
        self.unfit: list[UpstreamState] = []  # keys whose own limit is smaller than this one request
        self.over_limit: errors.RequestOverLimit | None = None
        self.last: Answered | Failed | None = None
        self.decision: retry.Decision | None = None  # the last retry decision (the forwarder logs it)

    def next(self, outcome: Outcome | None, now: float) -> Verdict:
        if outcome is not None:
            verdict = self._after(outcome, now)
            if verdict is not None:
                return verdict
        return self._pick(now)

    def _after(self, outcome: Outcome, now: float) -> Verdict | None:
        if isinstance(outcome, HeldOff | OverLimit):  # not sent: no attempt used
            self.attempts -= 1
            self.here -= 1
            if isinstance(outcome, HeldOff):  # this key's own quota is spent: the next key
                outcome.member.limited_until = now + outcome.seconds
            else:  # never fits this key: skip it for this request only
                self.unfit.append(outcome.member)
                self.over_limit = outcome.error
            return None
        route = self.route
        if isinstance(outcome, Answered) and (outcome.status < 400 or outcome.status not in route.policy.statuses):
            return Finish(served=True)
        self.tried.append(outcome.member)
        self.last = outcome
        status, code, asked = (
            (outcome.status, None, outcome.asked_delay) if isinstance(outcome, Answered) else (None, outcome.code, None)
        )
        members = self.groups.members(route.provider, route.host, route.port)
        decision = self.decision = retry.decide(
            route.policy, attempts_made=self.here, method=self.method, replayable=self.replayable,
            elapsed=now - self.start, status=status, error_code=code, asked_delay=asked,
            switching=_untried(members, self.tried, now), rand=self.rand,
        )  # fmt: skip
        if decision.retry:
            return Sleep(decision.delay) if decision.delay else None
        nxt = self._next_route(now) if decision.failover else None
        return Finish() if nxt is None else self._switch(nxt)

    def _pick(self, now: float) -> Verdict:
        route = self.route
        members = self.groups.members(route.provider, route.host, route.port)
        choices = [m for m in members if m not in self.unfit] if self.unfit else members
        first_route = route.provider is self.matched and not self.unfit
        state = self._choose(route, choices, self.tried, first_route, now)
        if state is None:  # no member can take it: every circuit is open, or every key is too small
            nxt = self._next_route(now) if self.replayable or not self.attempts else None
            if nxt is not None:
                return self._switch(nxt)
            if self.last is not None:
                return Finish()
            return Finish(self.over_limit or circuit_open(route.provider, members, now))
        self.attempts += 1
        self.here += 1
        return Send(state, self.attempts)

    def _switch(self, route: Route) -> Failover:
        self.route, self.tried, self.here = route, [], 0
        return Failover(route)

    def _choose(self, route: Route, members: list[UpstreamState], tried: list[UpstreamState], first_route: bool,
                now: float) -> UpstreamState | None:  # fmt: skip
        if len(members) == 1 and first_route:  # the request hook checked the secret
            state = members[0]
            return state if state.available(now) else None
        usable = [s for s in members if self.usable(route.provider, s.target)]
        return balance.pick(usable, route.provider.balance, now, self.rand, tried)

    def _next_route(self, now: float) -> Route | None:
        """The next fallback of the matched provider that can take this request
        and has a member whose circuit lets it through."""
        route = self.route
        if now - self.start >= route.policy.deadline:
            return None
        fallbacks = self.matched.fallbacks
        for index in range(route.next_fallback, len(fallbacks)):
            fb = fallbacks[index]
            target = self.policy.provider(fb.provider)
            rewritten = failover.rewrite(fb, self.path, self.body) if target is not None else None
            if target is None or rewritten is None:
                continue
            host, port = address(target)
            nxt = Route(target, dataclasses.replace(target.retry, deadline=route.policy.deadline), None, host, port,
                        rewritten.path, rewritten.body, index + 1)  # fmt: skip
            if self._choose(nxt, self.groups.members(target, host, port), [], False, now) is not None:
                return nxt
        return None


def address(provider: Provider) -> tuple[str, int]:
    """Where a fallback's members without their own URL go (the loader makes
    sure such a provider has an upstream or an exact first host)."""
    up = provider.upstream
    return (up.host, up.port) if up is not None else (provider.hosts[0], 443)


def _untried(members: list[UpstreamState], tried: list[UpstreamState], now: float) -> bool:
    """Whether another member can take the retry now (no need to back off)."""
    return len(members) > 1 and any(s not in tried and s.available(now) for s in members)


def circuit_open(provider: Provider, members: list[UpstreamState], now: float) -> errors.ProxyError:
    """No member can take a request: say when one can again."""
    waits = [max(s.breaker.retry_after(now), s.resting_until - now, s.limited_until - now) for s in members]
    seconds = math.ceil(min(waits, default=1.0)) or 1
    if any(s.limited_until > now for s in members) and all(s.breaker.state == "closed" for s in members):
        return errors.RateLimited(provider.name, scope="upstream", seconds=seconds)
    if all(s.breaker.state == "closed" for s in members):  # resting after 429s, circuits fine
        return errors.UpstreamThrottled(provider.name, seconds=seconds)
    return errors.CircuitOpen(provider.name, seconds=seconds)
