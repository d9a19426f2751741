"""Retry decisions, backoff and server-requested delays: pure, table-driven."""

from __future__ import annotations

import email.utils

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.attempt_loop import with_overrides
from proxy.policy import RetryPolicy
from proxy.retry import backoff, decide, go_duration, server_delay

P = RetryPolicy(attempts=3, backoff_base=0.5, backoff_cap=4.0, deadline=30.0)
NOW = 1_700_000_000.0


def top(_: object = None) -> float:
    return 1.0  # the top of the jitter range, so schedules are exact


@pytest.mark.parametrize(("n", "expected"), [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (4, 4.0), (10, 4.0)])
def test_backoff_schedule_at_the_top_of_the_jitter(n: int, expected: float) -> None:
    assert backoff(n, P, top) == expected


@given(st.integers(0, 60), st.floats(0, 1, exclude_max=True))
def test_full_jitter_stays_within_bounds(n: int, r: float) -> None:
    assert 0 <= backoff(n, P, lambda: r) <= P.backoff_cap


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0s", 0.0),
        ("", None),
        ("5", None),
        ("1x", None),
    ],
)
def test_go_durations(text: str, seconds: float | None) -> None:
    assert go_duration(text) == seconds


@pytest.mark.parametrize(
    ("headers", "delay"),
    [
        ({}, None),
        ({"retry-after": "7"}, 7.0),
        ({"retry-after": email.utils.formatdate(NOW + 12, usegmt=True)}, 12.0),
        ({"retry-after": email.utils.formatdate(NOW - 5, usegmt=True)}, 0.0),
        ({"retry-after": "soon"}, None),
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),
        ({"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}, 360.0),
        ({"anthropic-ratelimit-requests-reset": "2023-11-14T22:13:50Z"}, 30.0),
    ],
)
def test_server_delay(headers: dict[str, str], delay: float | None) -> None:
    assert server_delay(headers, NOW) == delay


@pytest.mark.parametrize(
    ("kwargs", "retry", "reason"),
    [
        ({"status": 503, "method": "GET"}, True, "retry"),
        ({"status": 500, "method": "POST"}, False, "not idempotent"),
        ({"status": 429, "method": "POST"}, True, "retry"),  # the upstream says it did not process it
        ({"status": 503, "method": "POST", "asked_delay": 1.0}, True, "retry"),
        ({"status": 503, "method": "POST"}, False, "not idempotent"),
        ({"status": 404, "method": "GET"}, False, "status not retried"),
        ({"error_code": "upstream_connect_error", "method": "POST"}, True, "retry"),  # never reached it
        ({"error_code": "upstream_timeout", "method": "POST"}, False, "not idempotent"),
        ({"error_code": "upstream_timeout", "method": "GET"}, True, "retry"),
        ({"error_code": "upstream_tls_error", "method": "GET"}, False, "error not retried"),
        ({"error_code": "address_blocked", "method": "GET"}, False, "error not retried"),
        ({"status": 503, "method": "GET", "attempts_made": 3}, False, "attempts exhausted"),
        ({"status": 503, "method": "GET", "replayable": False}, False, "body not replayable"),
        ({"status": 429, "method": "GET", "asked_delay": 29.5, "elapsed": 1.0}, False, "deadline"),
        ({"status": 429, "method": "GET", "asked_delay": 2.0, "elapsed": 1.0}, True, "retry"),
    ],
)
def test_decide(kwargs: dict[str, object], retry: bool, reason: str) -> None:
    args: dict[str, object] = {"attempts_made": 1, "replayable": True, "elapsed": 0.0, **kwargs}
    decision = decide(P, rand=top, **args)  # type: ignore[arg-type]
    assert (decision.retry, decision.reason) == (retry, reason)


def test_delay_is_the_servers_when_given_else_backoff() -> None:
    assert decide(P, attempts_made=1, method="GET", replayable=True, elapsed=0, status=503, rand=top).delay == 0.5
    assert decide(P, attempts_made=2, method="GET", replayable=True, elapsed=0, status=503, rand=top).delay == 1.0
    assert (
        decide(P, attempts_made=1, method="GET", replayable=True, elapsed=0, status=429, asked_delay=3, rand=top).delay
        == 3
    )


def test_opt_in_retries_non_idempotent() -> None:
    policy = RetryPolicy(non_idempotent=True)
    assert decide(policy, attempts_made=1, method="POST", replayable=True, elapsed=0, status=500, rand=top).retry


@pytest.mark.parametrize(
    ("retries", "timeout", "attempts", "deadline"),
    [(None, None, 3, 30.0), ("0", None, 1, 30.0), ("5", "2.5", 6, 2.5), ("99", None, 11, 30.0), ("x", "-1", 3, 30.0)],
)
def test_caller_overrides(retries: str | None, timeout: str | None, attempts: int, deadline: float) -> None:
    got = with_overrides(P, retries, timeout)
    assert (got.attempts, got.deadline) == (attempts, deadline)


@pytest.mark.parametrize(
    ("headers", "rest"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1m30s"}, 90.0),
        ({"x-ratelimit-remaining-requests": "5", "x-ratelimit-reset-requests": "1m30s"}, None),  # room left
        (
            {
                "x-ratelimit-remaining-requests": "3",
                "x-ratelimit-reset-requests": "10s",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "250ms",
            },
            0.25,  # only the spent counter's reset counts
        ),  # fmt: skip
        (
            {"anthropic-ratelimit-tokens-remaining": "0", "anthropic-ratelimit-tokens-reset": "2026-11-27T00:00:12Z"},
            12.0,
        ),
        ({"x-ratelimit-remaining-requests": "0"}, None),  # no reset named: nothing to go by
    ],
)
def test_quota_rest_from_remaining_headers(headers: dict[str, str], rest: float | None) -> None:
    from datetime import UTC, datetime

    from proxy.retry import quota_rest

    now = datetime(2026, 11, 27, tzinfo=UTC).timestamp()
    assert quota_rest(headers, now) == rest
