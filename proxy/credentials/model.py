"""The credential model: values with an expiry, sources that fetch them, and
the pure decisions about when to re-read and whether a value may be served.

Times are seconds on one clock (``time.time``, injected in tests), so an
expiry can be shown as a wall-clock time and compared with ``now`` alike.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.policy.credential_model import Timing

Freshness = Literal["fresh", "stale", "failing"]

# An expiring credential is refreshed at half its lifetime, which is at least
# this long before it expires for any token living twice as long (a token
# refreshed at the last second may expire on the wire). A shorter-lived one
# still refreshes at half: earlier would be a fetch loop.
EXPIRY_MARGIN = 60.0
BACKOFF_BASE = 1.0
BACKOFF_CAP = 30.0


@dataclass(frozen=True, slots=True)
class Credential:
    """A secret value and when it stops working (None: it does not expire)."""

    value: str
    expires_at: float | None = None

    def __repr__(self) -> str:  # never the value
        return f"Credential(expires_at={self.expires_at!r})"


class SourceError(Exception):
    """A fetch failed. The message is a fixed phrase plus non-secret fields
    (a status code, an exception type), never a response body or a value."""


def error_word(word: object, fallback: str) -> str:
    """A remote error code fit for a log line: an identifier-shaped word (OAuth2's
    ``invalid_client``, AWS's ``ResourceNotFoundException``) or ``fallback``. The code comes
    from the remote answer, so anything else (a phrase, a quoted request) is not repeated."""
    return word if isinstance(word, str) and word.isidentifier() and len(word) <= 64 else fallback


class Source(Protocol):
    """Where one secret is fetched from. ``source`` names it for logs and
    the admin API (``vault:secret/data/openai#api_key``), never its value."""

    source: str

    async def fetch(self) -> Credential: ...


@dataclass(frozen=True, slots=True)
class Plan:
    refresh_at: float  # when to fetch again
    usable_until: float  # after this the value is not served (fail closed)


def plan(timing: Timing, fetched_at: float, cred: Credential) -> Plan:
    """When a credential fetched at ``fetched_at`` is re-read and until when it
    may be served; both capped by the credential's own expiry."""
    inf = float("inf")
    expires = cred.expires_at if cred.expires_at is not None else inf
    if timing.follow_expiry and expires != inf:
        return Plan(fetched_at + max(expires - fetched_at, 0.0) / 2, expires)
    refresh = min(fetched_at + timing.ttl, expires)
    return Plan(refresh, min(fetched_at + timing.ttl + timing.stale_for, expires))


def freshness(now: float, p: Plan | None, failures: int) -> Freshness:
    """fresh: a value within its refresh time, or served while the last
    re-read has not failed; stale: served, but re-reads are failing; failing:
    nothing may be served."""
    if p is None or now >= p.usable_until:
        return "failing"
    return "stale" if failures else "fresh"


def retry_at(now: float, failures: int, p: Plan | None, rand: float | None = None) -> float:
    """The next attempt after ``failures`` consecutive failed fetches: full
    jitter over an exponential step (as ``proxy.retry``), capped; never later
    than the moment the value stops being usable."""
    step: float = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** max(failures - 1, 0))
    at: float = now + max(step * (random.random() if rand is None else rand), 0.05)
    if p is not None and now < p.usable_until:
        return min(at, p.usable_until)
    return at
