"""The attempt planner, table by table: every path the forwarder's loop took
before it only carried out verdicts (retry, backoff, Retry-After, switching
members, per-key limits, open circuits, failover with rewrites, deadlines).
Pure: ``now`` is passed in and the random source is the top of the jitter."""

from __future__ import annotations

import dataclasses
import json

import pytest

from proxy import errors
from proxy.balance import Groups, UpstreamState
from proxy.plan import (
    Answered,
    Failed,
    Failover,
    Finish,
    HeldOff,
    OverLimit,
    Plan,
    Route,
    Send,
    Sleep,
    Verdict,
)
from proxy.policy import CircuitPolicy, Fallback, Policy, Provider, RetryPolicy, Target, Upstream
from proxy.testing import make_provider

START = 1000.0
RETRY = RetryPolicy(attempts=3, backoff_base=0.5, backoff_cap=4.0, deadline=30.0)


def top() -> float:
    return 1.0  # the top of the jitter range: backoffs are exact


def provider(name: str = "openai", *, members: int = 1, **changes: object) -> Provider:
    targets = tuple(Target(f"key-{i}") for i in range(members))
    base = make_provider(name, (f"{name}.test",), upstream=Upstream(f"{name}.test", 443))
    fields: dict[str, object] = {"retry": RETRY, "circuit": CircuitPolicy(failures=1, cooldown=10.0), **changes}
    return dataclasses.replace(base, targets=targets, **fields)  # type: ignore[arg-type]


class Case:
    """A plan for ``matched`` (and the policy's other providers), and the groups it picks from."""

    def __init__(self, matched: Provider, *others: Provider, method: str = "GET", replayable: bool = True,
                 body: object = b"", path: str = "/v1/chat/completions", attempts: int = 0,
                 usable: frozenset[str] | None = None) -> None:  # fmt: skip
        self.groups = Groups()
        self.policy = Policy(providers=(matched, *others))
        route = Route(matched, matched.retry, f"https://{matched.hosts[0]}{path}", matched.hosts[0], 443)
        self.plan = Plan(
            route, self.groups, self.policy, method=method, replayable=replayable, start=START,
            usable=lambda _p, t: usable is None or t.name in usable, rand=top, path=path, body=body,
            attempts=attempts,
        )  # fmt: skip

    def members(self, p: Provider) -> list[UpstreamState]:
        up = p.upstream
        assert up is not None
        return self.groups.members(p, up.host, up.port)

    def member(self, p: Provider, index: int = 0) -> UpstreamState:
        return self.members(p)[index]


def sent(verdict: Verdict) -> UpstreamState:
    assert isinstance(verdict, Send), verdict
    return verdict.member


# -- one member: retry, backoff, what is not retried ---------------------------------
def test_first_verdict_sends_attempt_one() -> None:
    case = Case(provider())
    verdict = case.plan.next(None, START)
    assert verdict == Send(case.member(case.plan.matched), 1)


@pytest.mark.parametrize(
    ("method", "outcome", "expected"),
    [
        ("GET", ("status", 500), Sleep(0.5)),  # idempotent: backoff 0.5 s (first retry, top of the jitter)
        ("GET", ("error", "upstream_timeout"), Sleep(0.5)),
        ("POST", ("status", 500), Finish()),  # may have been processed: the 500 is the answer
        ("POST", ("error", "upstream_timeout"), Finish()),
        ("POST", ("error", "upstream_connect_error"), Sleep(0.5)),  # never reached the upstream
        ("POST", ("status", 429), Sleep(0.5)),  # refused, so never processed
        ("POST", ("error", "credential_unavailable"), Finish()),  # not an upstream failure
        ("GET", ("status", 200), Finish(served=True)),
        ("GET", ("status", 404), Finish(served=True)),  # a 4xx the policy does not retry is the answer
        ("GET", ("status", 501), Finish(served=True)),  # not in retry.statuses
    ],
)
def test_after_the_first_attempt(method: str, outcome: tuple[str, object], expected: Verdict) -> None:
    case = Case(provider(), method=method)
    member = sent(case.plan.next(None, START))
    kind, value = outcome
    result = Answered(member, int(value)) if kind == "status" else Failed(member, str(value))  # type: ignore[call-overload]
    assert case.plan.next(result, START + 0.1) == expected


def test_backoff_doubles_then_attempts_run_out() -> None:
    case = Case(provider())
    member = sent(case.plan.next(None, START))
    assert case.plan.next(Answered(member, 503), START) == Sleep(0.5)
    assert case.plan.next(None, START + 0.5) == Send(member, 2)
    assert case.plan.next(Answered(member, 503), START + 0.6) == Sleep(1.0)
    assert case.plan.next(None, START + 1.6) == Send(member, 3)
    assert case.plan.next(Answered(member, 503), START + 1.7) == Finish()  # the last 503 is the answer
    assert case.plan.attempts == 3
    assert case.plan.decision is not None and case.plan.decision.reason == "attempts exhausted"


def test_server_asked_delay_is_honoured_and_beyond_the_deadline_ends() -> None:
    case = Case(provider(), method="POST")
    member = sent(case.plan.next(None, START))
    assert case.plan.next(Answered(member, 429, asked_delay=2.0), START) == Sleep(2.0)
    case = Case(provider(), method="POST")
    member = sent(case.plan.next(None, START))
    assert case.plan.next(Answered(member, 429, asked_delay=60.0), START) == Finish()  # no fallback to go to


def test_a_body_that_cannot_be_sent_again_is_not_retried() -> None:
    case = Case(provider(), replayable=False)
    member = sent(case.plan.next(None, START))
    assert case.plan.next(Failed(member, "upstream_connect_error"), START) == Finish()


def test_the_forwarders_first_attempt_counts() -> None:
    """The forwarder sends the common first attempt without a plan; the plan continues from it."""
    p = provider()
    case = Case(p, attempts=1)
    member = case.member(p)
    assert case.plan.next(Answered(member, 500), START) == Sleep(0.5)
    assert case.plan.next(None, START + 0.5) == Send(member, 2)


# -- a pool of members -----------------------------------------------------------------
def test_a_failed_member_hands_over_to_an_untried_one_at_once() -> None:
    p = provider(members=2)
    case = Case(p)
    first = sent(case.plan.next(None, START))
    verdict = case.plan.next(Answered(first, 500), START)  # switching: no backoff
    second = sent(verdict)
    assert second is not first and verdict == Send(second, 2)
    assert case.plan.next(Answered(second, 500), START) == Sleep(1.0)  # both tried: back off
    assert sent(case.plan.next(None, START + 1.0)) in (first, second)


def test_members_without_their_credential_are_not_picked() -> None:
    p = provider(members=2)
    case = Case(p, usable=frozenset({"key-1"}))
    assert sent(case.plan.next(None, START)).name == "key-1"


def test_held_off_member_rests_and_uses_no_attempt() -> None:
    p = provider(members=2)
    case = Case(p)
    first = sent(case.plan.next(None, START))
    verdict = case.plan.next(HeldOff(first, 5.0), START)
    assert first.limited_until == START + 5.0
    assert sent(verdict) is not first and verdict == Send(sent(verdict), 1)  # still attempt 1


def test_every_key_held_off_is_a_sidekey_rate_limit() -> None:
    p = provider()
    case = Case(p)
    member = sent(case.plan.next(None, START))
    verdict = case.plan.next(HeldOff(member, 2.5), START)
    assert isinstance(verdict, Finish) and isinstance(verdict.error, errors.RateLimited)
    assert verdict.error.fields == {"scope": "upstream", "seconds": 3}
    assert case.plan.attempts == 0


def test_a_key_too_small_for_the_request_is_skipped_for_it_only() -> None:
    p = dataclasses.replace(provider(members=2), balance="least_in_flight")
    case = Case(p)
    first = sent(case.plan.next(None, START))
    over = errors.RequestOverLimit(p.name, scope="upstream", rule="tokens", limit=5, reserved=10)
    second = sent(case.plan.next(OverLimit(first, over), START))
    assert second is not first and first.limited_until == 0.0
    verdict = case.plan.next(OverLimit(second, over), START)
    assert verdict == Finish(over)  # no key can ever take it


# -- nothing can take it -----------------------------------------------------------------
def test_open_circuits_answer_with_when_to_come_back() -> None:
    p = provider()
    case = Case(p)
    member = case.member(p)
    member.record(True, START - 1, status=500)  # failures=1: open, cooldown 10 s
    verdict = case.plan.next(None, START)
    assert isinstance(verdict, Finish) and isinstance(verdict.error, errors.CircuitOpen)
    assert verdict.error.fields["seconds"] == 9


def test_a_key_resting_after_429_is_upstream_throttled() -> None:
    p = provider()
    case = Case(p)
    case.member(p).resting_until = START + 4.2
    verdict = case.plan.next(None, START)
    assert isinstance(verdict, Finish) and isinstance(verdict.error, errors.UpstreamThrottled)
    assert verdict.error.fields["seconds"] == 5


def test_after_a_failure_an_open_circuit_finishes_with_that_failure() -> None:
    p = provider()
    case = Case(p)
    member = sent(case.plan.next(None, START))
    member.record(True, START, status=500)  # the forwarder records the outcome: the circuit opens
    assert case.plan.next(Answered(member, 500), START) == Sleep(0.5)
    assert case.plan.next(None, START + 0.5) == Finish()  # the 500 is the answer, not circuit_open


# -- failover ----------------------------------------------------------------------------
def with_fallback(fallback: Fallback, **retry: object) -> tuple[Provider, Provider]:
    backup = provider("azure")
    matched = provider(fallbacks=(fallback,), retry=dataclasses.replace(RETRY, **retry))  # type: ignore[arg-type]
    return matched, backup


def test_attempts_run_out_then_the_fallback_gets_the_rewritten_request() -> None:
    matched, backup = with_fallback(
        Fallback("azure", rewrite_from="/v1/", rewrite_to="/openai/v1/", models=(("gpt-4o", "gpt-4o-eu"),)),
        attempts=1,
    )
    body = json.dumps({"model": "gpt-4o", "messages": []}).encode()
    case = Case(matched, backup, method="POST", body=body)
    member = sent(case.plan.next(None, START))
    verdict = case.plan.next(Failed(member, "upstream_connect_error"), START + 1)
    assert isinstance(verdict, Failover)
    route = verdict.route
    assert (route.provider, route.path, route.url, route.host) == (backup, "/openai/v1/chat/completions", None,
                                                                   "azure.test")  # fmt: skip
    assert route.body is not None and json.loads(route.body)["model"] == "gpt-4o-eu"
    assert route.policy.deadline == matched.retry.deadline  # one deadline for the whole request
    assert case.plan.next(None, START + 1) == Send(case.member(backup), 2)
    assert case.plan.next(Answered(case.member(backup), 500), START + 2) == Finish()  # POST 500: no retry


def test_a_matched_provider_with_every_circuit_open_fails_over_before_any_attempt() -> None:
    matched, backup = with_fallback(Fallback("azure"))
    case = Case(matched, backup, replayable=False)  # nothing sent yet: even a stream may go
    case.member(matched).record(True, START, status=500)
    verdict = case.plan.next(None, START)
    assert isinstance(verdict, Failover) and verdict.route.provider is backup
    assert case.plan.next(None, START) == Send(case.member(backup), 1)


@pytest.mark.parametrize(
    ("fallback", "body", "why"),
    [
        (Fallback("azure", paths=("/v1/embeddings",)), b"{}", "path outside its paths"),
        (Fallback("azure", models=(("gpt-4o", "x"),)), b'{"model": "o1"}', "model not in its table"),
        (Fallback("nowhere"), b"{}", "not in the policy"),
    ],
)
def test_a_fallback_that_cannot_take_the_request_is_skipped(fallback: Fallback, body: bytes, why: str) -> None:
    matched, backup = with_fallback(fallback, attempts=1)
    case = Case(matched, backup, body=body)
    member = sent(case.plan.next(None, START))
    assert case.plan.next(Answered(member, 503), START) == Finish(), why


def test_a_fallback_whose_circuits_are_open_is_skipped_for_the_next() -> None:
    backup, third = provider("azure"), provider("bedrock")
    matched = provider(fallbacks=(Fallback("azure"), Fallback("bedrock")), retry=dataclasses.replace(RETRY, attempts=1))
    case = Case(matched, backup, third)
    case.member(backup).record(True, START, status=500)
    member = sent(case.plan.next(None, START))
    verdict = case.plan.next(Answered(member, 503), START)
    assert isinstance(verdict, Failover) and verdict.route.provider is third and verdict.route.next_fallback == 2


def test_no_failover_once_the_deadline_passed() -> None:
    matched, backup = with_fallback(Fallback("azure"), attempts=1, deadline=5.0)
    case = Case(matched, backup)
    member = sent(case.plan.next(None, START))
    assert case.plan.next(Answered(member, 503), START + 6) == Finish()


def test_a_wait_beyond_the_deadline_goes_to_the_fallback_instead() -> None:
    matched, backup = with_fallback(Fallback("azure"))
    case = Case(matched, backup, method="POST")
    member = sent(case.plan.next(None, START))
    verdict = case.plan.next(Answered(member, 429, asked_delay=120.0), START)
    assert isinstance(verdict, Failover) and verdict.route.provider is backup


def test_after_failover_a_fallback_with_nothing_left_finishes_on_its_last_answer() -> None:
    matched, backup = with_fallback(Fallback("azure"), attempts=1)
    backup = dataclasses.replace(backup, retry=dataclasses.replace(RETRY, attempts=1))
    case = Case(matched, backup)
    first = sent(case.plan.next(None, START))
    assert isinstance(case.plan.next(Answered(first, 502), START), Failover)
    second = sent(case.plan.next(None, START))
    assert case.plan.next(Failed(second, "upstream_timeout"), START) == Finish()
    assert case.plan.attempts == 2
