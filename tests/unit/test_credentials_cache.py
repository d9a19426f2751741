"""The credential model's decisions (pure, table-tested) and the cache that
applies them, driven by an injected clock and an in-memory source."""

from __future__ import annotations

import asyncio

import pytest

from proxy.credentials.cache import CachedCredential
from proxy.credentials.model import EXPIRY_MARGIN, Credential, Plan, SourceError, freshness, plan, retry_at
from proxy.policy.credential_model import Timing


@pytest.mark.parametrize(
    ("timing", "fetched", "cred", "expected"),
    [
        (Timing(ttl=300, stale_for=3600), 1000, Credential("k"), Plan(1300, 4900)),
        # a store value that expires sooner than ttl + stale_for is served until it expires, no longer
        (Timing(ttl=300, stale_for=3600), 1000, Credential("k", 1200), Plan(1200, 1200)),
        (Timing(ttl=300, stale_for=0), 1000, Credential("k"), Plan(1300, 1300)),
        # OAuth2: at half the lifetime, at least EXPIRY_MARGIN before expiry for a 2-minute token ...
        (Timing(follow_expiry=True), 1000, Credential("t", 4600), Plan(2800, 4600)),
        (Timing(follow_expiry=True), 1000, Credential("t", 1000 + 2 * EXPIRY_MARGIN), Plan(1000 + EXPIRY_MARGIN, 1120)),
        # ... and at half for a shorter one too (earlier would be a fetch loop)
        (Timing(follow_expiry=True), 1000, Credential("t", 1030), Plan(1015, 1030)),
        (Timing(follow_expiry=True), 1000, Credential("t", 990), Plan(1000, 990)),  # expired on arrival
        # a token without expiry follows ttl like a store value
        (Timing(ttl=60, stale_for=0, follow_expiry=True), 1000, Credential("t"), Plan(1060, 1060)),
    ],
)
def test_plan(timing: Timing, fetched: float, cred: Credential, expected: Plan) -> None:
    assert plan(timing, fetched, cred) == expected


@pytest.mark.parametrize(
    ("now", "p", "failures", "state"),
    [
        (10, None, 0, "failing"),
        (10, Plan(20, 30), 0, "fresh"),
        (25, Plan(20, 30), 0, "fresh"),  # due for a re-read that has not failed
        (25, Plan(20, 30), 2, "stale"),
        (30, Plan(20, 30), 2, "failing"),
        (31, Plan(20, 30), 0, "failing"),
    ],
)
def test_freshness(now: float, p: Plan | None, failures: int, state: str) -> None:
    assert freshness(now, p, failures) == state


def test_backoff_grows_caps_and_never_passes_the_usable_time() -> None:
    steps = [retry_at(0, n, None, rand=1.0) for n in range(1, 10)]
    assert steps[:4] == [1, 2, 4, 8] and max(steps) == 30
    assert retry_at(0, 9, Plan(0, 5), rand=1.0) == 5
    assert retry_at(0, 1, None, rand=0.0) == 0.05  # never a busy loop


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class MemorySource:
    source = "memory:test"

    def __init__(self, value: str = "v1") -> None:
        self.value: str | None = value
        self.fetches = 0
        self.gate: asyncio.Event | None = None

    async def fetch(self) -> Credential:
        self.fetches += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.value is None:
            raise SourceError("store unreachable")
        return Credential(self.value)


@pytest.mark.asyncio
async def test_single_flight_under_many_concurrent_callers() -> None:
    src = MemorySource()
    src.gate = asyncio.Event()
    entry = CachedCredential(src, Timing(ttl=10, stale_for=5), clock=Clock())
    callers = [asyncio.create_task(entry.refresh()) for _ in range(100)]
    await asyncio.sleep(0)
    src.gate.set()
    outcomes = await asyncio.gather(*callers)
    assert src.fetches == 1
    assert sorted(o.result for o in outcomes).count("ok") == 1 and entry.counts["shared"] == 99
    assert entry.value() == "v1"


@pytest.mark.asyncio
async def test_ttl_stale_for_and_recovery() -> None:
    clock, src = Clock(), MemorySource()
    entry = CachedCredential(src, Timing(ttl=10, stale_for=5), clock=clock)
    assert entry.value() is None and entry.state() == "failing"
    await entry.refresh()
    assert entry.value() == "v1" and entry.state() == "fresh" and not entry.due(clock.now)
    clock.now += 10
    assert entry.due(clock.now)
    src.value = None  # the store goes away
    assert (await entry.refresh()).result == "error"
    assert entry.value() == "v1" and entry.state() == "stale"  # served stale ...
    assert not entry.due(clock.now) and entry.next_attempt > clock.now  # ... and backing off
    clock.now += 5  # ttl + stale_for after the last good read
    assert entry.value() is None and entry.state() == "failing"
    src.value = "v2"
    clock.now = entry.next_attempt
    assert (await entry.refresh()).changed
    assert entry.value() == "v2" and entry.state() == "fresh" and entry.failures == 0


@pytest.mark.asyncio
async def test_a_value_unfit_for_a_header_is_refused() -> None:
    entry = CachedCredential(MemorySource("ok\r\nX-Injected: 1"), Timing(), clock=Clock())
    assert (await entry.refresh()).result == "error"
    assert entry.value() is None and entry.problem is not None and "X-Injected" not in entry.problem
    assert "ok" not in repr(entry)


@pytest.mark.asyncio
async def test_invalidate_makes_it_due_and_keeps_serving_until_replaced() -> None:
    clock, src = Clock(), MemorySource()
    entry = CachedCredential(src, Timing(ttl=3600), clock=clock)
    await entry.refresh()
    entry.invalidate()
    assert entry.due(clock.now) and entry.value() == "v1"
    src.value = "v2"
    assert (await entry.refresh()).changed and entry.value() == "v2"


@pytest.mark.parametrize(
    ("word", "expected"),
    [
        ("invalid_client", "invalid_client"),
        ("ResourceNotFoundException", "ResourceNotFoundException"),
        ("bad secret sk-live-123 in request", "HTTP 400"),  # a phrase from the remote side is not repeated
        ("x" * 65, "HTTP 400"),
        (None, "HTTP 400"),
        (42, "HTTP 400"),
    ],
)
def test_error_word_repeats_only_identifier_shaped_codes(word: object, expected: str) -> None:
    from proxy.credentials.model import error_word

    assert error_word(word, "HTTP 400") == expected
