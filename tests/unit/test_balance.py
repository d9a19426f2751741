"""Upstream group selection and member state, without sockets."""

from __future__ import annotations

import dataclasses
import itertools
from collections import Counter

import pytest

from proxy.balance import FLAP_WINDOW, Groups, Transition, UpstreamState, flip_line, pick
from proxy.policy import Balance, CircuitPolicy, Target
from proxy.testing import make_provider

CIRCUIT = CircuitPolicy(failures=2, cooldown=10.0)


def members(*targets: Target, circuit: CircuitPolicy = CIRCUIT) -> list[UpstreamState]:
    provider = dataclasses.replace(make_provider(), targets=targets, circuit=circuit)
    return [UpstreamState(provider, t, "h", 443) for t in targets]


def cycle(values: list[float]) -> itertools.cycle[float]:
    return itertools.cycle(values)


def rand_from(values: list[float]):  # type: ignore[no-untyped-def]
    it = cycle(values)
    return lambda: next(it)


def test_lowest_priority_wins_while_it_is_usable() -> None:
    a, b = members(Target("a", priority=1), Target("b", priority=0))
    assert pick([a, b], "weighted", 0.0, lambda: 0.0) is b
    b.record(True, 0.0)
    b.record(True, 0.0)  # circuit opens after 2
    assert b.breaker.state == "open"
    assert pick([a, b], "weighted", 1.0, lambda: 0.0) is a
    assert pick([a, b], "weighted", 11.0, lambda: 0.0) is b  # cooldown over: its probe goes first


def test_healthy_members_are_preferred_across_priorities() -> None:
    circuit = CircuitPolicy(failures=10)  # the circuit stays closed; passive health turns first
    a, b = members(Target("a", priority=0), Target("b", priority=1), circuit=circuit)
    for _ in range(3):
        a.record(True, 100.0)
    assert not a.healthy and a.breaker.state == "closed"
    assert pick([a, b], "weighted", 100.0, lambda: 0.0) is b
    assert pick([a, b], "weighted", 110.0, lambda: 0.0) is a  # out of traffic 10 s: one request to prove itself
    a.record(True, 110.0)
    for _ in range(3):
        b.record(True, 110.0)
    assert pick([a, b], "weighted", 111.0, lambda: 0.0) is a  # none healthy: priority decides again


def test_weighted_choice_follows_weight_times_score() -> None:
    a, b = members(Target("a", weight=3), Target("b", weight=1))
    draws = [i / 1000 for i in range(1000)]
    rand = rand_from(draws)
    counts = Counter(pick([a, b], "weighted", 0.0, rand).name for _ in draws)  # type: ignore[union-attr]
    assert counts == {"a": 750, "b": 250}
    for _ in range(2):
        b.record(False, 0.0)
    a.error_rate = 0.5  # a's recent failures halve its share: 3 * 0.5 vs 1 * 1
    rand = rand_from(draws)
    counts = Counter(pick([a, b], "weighted", 0.0, rand).name for _ in draws)  # type: ignore[union-attr]
    assert counts == {"a": 600, "b": 400}


@pytest.mark.parametrize(("mode", "expected"), [("least_in_flight", "b"), ("latency", "c")])
def test_least_in_flight_and_latency(mode: Balance, expected: str) -> None:
    a, b, c = members(Target("a", weight=1), Target("b", weight=4), Target("c", weight=1))
    a.in_flight, b.in_flight, c.in_flight = 1, 2, 3  # per weight: 1, 0.5, 3
    a.latency, b.latency, c.latency = 0.3, 0.2, 0.1
    assert pick([a, b, c], mode, 0.0, lambda: 0.0).name == expected  # type: ignore[union-attr]


def test_latency_is_a_decaying_average() -> None:
    [a] = members(Target("a"))
    a.record(False, 0.0, latency=1.0)
    assert a.latency == 1.0
    a.record(False, 0.0, latency=0.0)
    assert a.latency == pytest.approx(0.8)


def test_members_tried_in_this_request_are_skipped_until_all_were() -> None:
    a, b = members(Target("a"), Target("b"))
    assert pick([a, b], "weighted", 0.0, lambda: 0.0, tried=[a]) is b
    assert pick([a, b], "weighted", 0.0, lambda: 0.0, tried=[a, b]) is a  # all tried: try again


def test_a_429_with_a_reset_rests_the_member_then_it_returns() -> None:
    a, b = members(Target("a"), Target("b"))
    a.record(True, 100.0, status=429, retry_after=20.0)
    assert pick([a, b], "weighted", 100.0, lambda: 0.0) is b
    assert not a.available(119.0) and a.available(120.0)
    assert pick([a], "weighted", 110.0, lambda: 0.0) is None


def test_transitions_are_reported_once() -> None:
    [a] = members(Target("a"), circuit=CircuitPolicy(failures=3, cooldown=5.0, probes=1))
    assert a.record(True, 0.0) == []
    assert a.record(True, 0.0) == []
    assert a.record(True, 0.0) == ["circuit_open", "unhealthy"]
    assert a.record(True, 0.0) == []
    assert a.breaker.allow(6.0)  # half-open probe
    assert a.record(False, 6.0) == ["circuit_closed", "healthy"]


def test_active_checks_flip_health_after_the_configured_streaks() -> None:
    [a] = members(Target("a"))
    assert a.record_check(False, 1.0, healthy_after=2, unhealthy_after=2) == []
    assert a.record_check(False, 2.0, healthy_after=2, unhealthy_after=2) == ["unhealthy"]
    assert a.record_check(True, 3.0, healthy_after=2, unhealthy_after=2) == []
    assert a.record_check(True, 4.0, healthy_after=2, unhealthy_after=2) == ["healthy"]
    assert a.last_checked == 4.0


def test_groups_keep_state_across_reloads_and_follow_new_thresholds() -> None:
    groups = Groups()
    provider = dataclasses.replace(make_provider(), targets=(Target("a"), Target("b")))
    first = groups.members(provider, "api.openai.com", 443)
    assert groups.members(provider, "api.openai.com", 443) is first  # cached
    first[0].record(True, 0.0)
    reloaded = dataclasses.replace(provider, circuit=CircuitPolicy(failures=9), targets=(Target("a"), Target("c")))
    again = groups.members(reloaded, "api.openai.com", 443)
    assert again[0] is first[0] and again[0].consecutive == 1  # kept
    assert again[0].breaker.policy.failures == 9  # new threshold
    assert again[1].name == "c" and again[1].requests == 0
    assert [s["name"] for s in groups.statistics()] == ["a", "b", "c"]


# (seconds since the first flip, change) -> what flip_line answers: 0 or N = log at the change's
# level (N flips went to DEBUG since the last such line), None = DEBUG only.
FLAPPING: list[tuple[float, Transition, int | None]] = [
    (0.0, "unhealthy", 0),
    (0.5, "healthy", None),
    (1.0, "unhealthy", None),
    (2.0, "circuit_open", 0),  # circuit changes are always told, and do not count as flips
    (3.0, "circuit_closed", 0),
    (59.9, "healthy", None),
    (FLAP_WINDOW, "unhealthy", 3),  # a window on: told, with the three held back
    (FLAP_WINDOW + 1, "healthy", None),
    (3 * FLAP_WINDOW, "unhealthy", 1),
    (4 * FLAP_WINDOW + 1, "healthy", 0),  # a quiet member: every flip told
]


def test_a_flapping_member_logs_one_flip_per_window_and_counts_the_rest() -> None:
    (a,) = members(Target("a"))
    start = 1000.0
    assert [flip_line(a, change, start + t) for t, change, _ in FLAPPING] == [want for *_, want in FLAPPING]


def test_members_flap_independently_and_the_first_flip_is_always_told() -> None:
    a, b = members(Target("a"), Target("b"))
    assert flip_line(a, "unhealthy", 0.0) == 0  # even at a monotonic clock's zero
    assert flip_line(a, "healthy", 1.0) is None
    assert flip_line(b, "unhealthy", 1.0) == 0
