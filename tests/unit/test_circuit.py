"""The circuit breaker's transitions with an injected clock."""

from __future__ import annotations

from proxy.circuit import Breaker
from proxy.policy import CircuitPolicy

P = CircuitPolicy(failures=3, ratio=0.5, min_requests=10, window=10.0, cooldown=5.0, probes=1)


def test_opens_after_consecutive_failures_and_fails_fast() -> None:
    b = Breaker(P)
    for t in (0.0, 0.1, 0.2):
        assert b.allow(t)
        b.record(True, t)
    assert b.state == "open"
    assert not b.allow(1.0)
    assert b.retry_after(1.0) == 4.2


def test_success_resets_the_consecutive_count() -> None:
    b = Breaker(P)
    for failed in (True, True, False, True, True):
        b.record(failed, 0.0)
    assert b.state == "closed"


def test_half_open_lets_one_probe_through_then_closes_on_success() -> None:
    b = Breaker(P)
    for _ in range(3):
        b.record(True, 0.0)
    assert not b.allow(4.9)
    assert b.allow(5.0) and b.state == "half_open"
    assert not b.allow(5.0)  # one probe at a time
    b.record(False, 5.1)
    state: str = b.state  # record() moved it; mypy would keep the narrowing to "half_open" above
    assert state == "closed" and b.allow(5.2)


def test_failed_probe_reopens_for_a_fresh_cooldown() -> None:
    b = Breaker(P)
    for _ in range(3):
        b.record(True, 0.0)
    assert b.allow(6.0)
    b.record(True, 6.0)
    assert b.state == "open" and b.retry_after(6.0) == 5.0 and b.opens == 2


def test_abandoned_probe_frees_its_slot() -> None:
    b = Breaker(P)
    for _ in range(3):
        b.record(True, 0.0)
    assert b.allow(5.0)
    b.abandon()
    assert b.allow(5.0)


def test_retry_after_longer_than_the_cooldown_wins() -> None:
    b = Breaker(P)
    for _ in range(3):
        b.record(True, 0.0, retry_after=60.0)
    assert b.retry_after(0.0) == 60.0


def test_failure_ratio_over_the_window() -> None:
    b = Breaker(CircuitPolicy(failures=100, ratio=0.5, min_requests=10, window=10.0))
    for i in range(10):
        b.record(i % 2 == 1, i * 0.1)  # 5 of 10 failed, the 10th among them; never 100 in a row
    assert b.state == "open"


def test_old_events_leave_the_window() -> None:
    b = Breaker(CircuitPolicy(failures=100, ratio=0.5, min_requests=10, window=10.0))
    for i in range(9):
        b.record(True, float(i) * 0.1)
    for i in range(10):
        b.record(False, 20.0 + i * 0.1)  # the failures are 20 s old now
    b.record(True, 21.5)
    assert b.state == "closed"


def test_zero_failures_disables_it() -> None:
    b = Breaker(CircuitPolicy(failures=0))
    for _ in range(100):
        b.record(True, 0.0)
    assert b.state == "closed" and b.allow(0.0)
