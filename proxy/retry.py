"""Whether and when to try a failed attempt again. Pure: ``now`` and the
random source are passed in, so schedules are exact in tests.

The safety rule: a request that is not idempotent (RFC 9110 §9.2.2: POST,
PATCH) is retried only when the failure proves the upstream never processed
it: the connection was never made, or the upstream said so (429, or 503 with
Retry-After). A timeout or a 500 after the request went out could mean the
completion was generated and billed, so those are retried only for
idempotent methods, or when the policy opts in (``non_idempotent: true``).
"""

from __future__ import annotations

import email.utils
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime

from proxy.policy import RetryPolicy

IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
NEVER_PROCESSED_ERRORS = frozenset({"upstream_connect_error"})
MAYBE_PROCESSED_ERRORS = frozenset({"upstream_timeout", "upstream_disconnected", "upstream_protocol_error"})

# OpenAI's reset headers are Go durations: "1s", "6m0s", "20ms", "1h2m3.5s".
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_GO_UNITS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
RESET_HEADERS = ("x-ratelimit-reset-requests", "x-ratelimit-reset-tokens")
ANTHROPIC_RESET_HEADERS = (
    "anthropic-ratelimit-requests-reset",
    "anthropic-ratelimit-tokens-reset",
    "anthropic-ratelimit-input-tokens-reset",
    "anthropic-ratelimit-output-tokens-reset",
)


# (remaining, reset) header pairs: OpenAI/Groq (Go durations), Anthropic (RFC 3339 times).
QUOTA_HEADERS = (
    ("x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"),
    ("x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens"),
    ("anthropic-ratelimit-requests-remaining", "anthropic-ratelimit-requests-reset"),
    ("anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset"),
)


def quota_rest(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds until the key gets room again, when a successful answer says
    its window is spent (remaining 0); None otherwise. Lets sidekey rest the
    key before the upstream starts refusing it."""
    rest = None
    for remaining, reset in QUOTA_HEADERS:
        if headers.get(remaining) != "0":
            continue
        value = headers.get(reset)
        if value is None:
            continue
        seconds = go_duration(value)
        if seconds is None:
            try:
                seconds = max(0.0, datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() - now)
            except ValueError:
                continue
        rest = seconds if rest is None else max(rest, seconds)
    return rest


@dataclass(frozen=True, slots=True)
class Decision:
    retry: bool
    delay: float = 0.0
    reason: str = ""
    # Not retried here, but sending it elsewhere now is safe: only the budget
    # (attempts, or a server-asked wait beyond the deadline) ran out.
    failover: bool = False


def backoff(retry_number: int, policy: RetryPolicy, rand: Callable[[], float]) -> float:
    """Full jitter (AWS architecture blog, "Exponential Backoff and Jitter"):
    uniform in [0, min(cap, base * 2**n)] for the n-th retry (n from 0)."""
    ceiling: float = min(policy.backoff_cap, policy.backoff_base * (2.0**retry_number))
    return rand() * ceiling


def go_duration(text: str) -> float | None:
    text = text.strip()
    parts = _GO_DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return None
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def server_delay(headers: Mapping[str, str], now: float) -> float | None:
    """How long the upstream asked us to wait, in seconds, or None.

    ``retry-after-ms`` (OpenAI) wins, then ``Retry-After`` (RFC 9110 §10.2.3:
    delay-seconds or an HTTP-date), then the longest of the rate-limit reset
    headers (the exhausted limit is the one that must reset)."""
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    after = headers.get("retry-after")
    if after is not None:
        after = after.strip()
        if after.isdigit():
            return float(after)
        try:
            when = email.utils.parsedate_to_datetime(after)
        except (TypeError, ValueError):
            when = None
        if when is not None:
            return max(0.0, when.timestamp() - now)
    resets = [d for h in RESET_HEADERS if (v := headers.get(h)) is not None and (d := go_duration(v)) is not None]
    for h in ANTHROPIC_RESET_HEADERS:
        v = headers.get(h)
        if v is not None:
            try:
                resets.append(max(0.0, datetime.fromisoformat(v.replace("Z", "+00:00")).timestamp() - now))
            except ValueError:
                continue
    return max(resets) if resets else None


def decide(
    policy: RetryPolicy,
    *,
    attempts_made: int,
    method: str,
    replayable: bool,
    elapsed: float,
    status: int | None = None,
    error_code: str | None = None,
    asked_delay: float | None = None,
    switching: bool = False,
    rand: Callable[[], float],
) -> Decision:
    """After attempt number ``attempts_made`` failed (with ``status`` or
    ``error_code``), try again? ``elapsed``: seconds since the request arrived.
    ``switching``: the retry goes to another upstream of the group, which need
    not wait for this one's backoff or Retry-After."""
    if not replayable:
        return Decision(False, reason="body not replayable")
    safe = method in IDEMPOTENT or policy.non_idempotent
    if status is not None:
        if status not in policy.statuses:
            return Decision(False, reason="status not retried")
        never_processed = status == 429 or (status == 503 and asked_delay is not None)
        if not (safe or never_processed):
            return Decision(False, reason="not idempotent")
    elif error_code in NEVER_PROCESSED_ERRORS:
        pass
    elif error_code in MAYBE_PROCESSED_ERRORS:
        if not safe:
            return Decision(False, reason="not idempotent")
    else:
        return Decision(False, reason="error not retried")
    if attempts_made >= policy.attempts:
        return Decision(False, reason="attempts exhausted", failover=elapsed < policy.deadline)
    delay = asked_delay if asked_delay is not None else backoff(attempts_made - 1, policy, rand)
    if switching:
        delay = 0.0
    if elapsed + delay > policy.deadline:
        # The upstream asks for longer than we have: go elsewhere instead of sleeping.
        return Decision(False, reason="deadline", failover=elapsed < policy.deadline)
    return Decision(True, delay, "retry")
