"""RedisLimiter (addons/limits/redis_limiter.py) against a real redis-server.

The clock is Redis's own, so edges are checked through the waits the limiter reports (short
periods, sleeping exactly the reported Retry-After) instead of long sleeps.

On a loaded machine a round trip may take a second, so: calls that are not about the timeout get a
generous one; periods are long enough that the steps of a test fall inside one of them; and a wait
the limiter reports is bounded by the time measured around the calls (``elapsed``), never by how
fast an idle machine is.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from redis.asyncio import Redis

from addons.limits.arithmetic import CONCURRENT_RETRY_AFTER
from addons.limits.redis_limiter import PREFIX, LimiterUnavailable, RedisLimiter
from proxy.policy.rates import Rule
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the redis_server fixture

TIMEOUT = 0.25  # the client's whole-call timeout, where the timeout is what is tested
GENEROUS = 10.0  # elsewhere: a loaded machine must not turn a slow answer into LimiterUnavailable
SLACK = 0.003  # asyncio's and Redis's clocks are different clocks
LEASE = 2.0  # lease TTL where expiry is tested: the steps between expiries take far less, loaded or not


@pytest_asyncio.fixture
async def limiter(redis_server: RedisServer) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter.from_url(redis_server.url, timeout=GENEROUS)
    yield limiter
    await limiter.aclose()


@pytest_asyncio.fixture
async def raw(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def take(limiter: RedisLimiter, checks: list[tuple[str, Rule]], n: int, tokens: int = 0) -> list[bool]:
    return [(await limiter.acquire(checks, tokens)).allowed for _ in range(n)]


@pytest.mark.asyncio
async def test_sixty_per_hour_burst_then_one_per_minute(limiter: RedisLimiter) -> None:
    checks = [("provider:openai", Rule("requests", 60, 3600))]
    began = time.monotonic()
    assert await take(limiter, checks, 60) == [True] * 60
    refused = await limiter.acquire(checks, 0)
    elapsed = time.monotonic() - began
    assert not refused.allowed and refused.refused_by == "provider:openai requests-hour"
    # One emission interval (60 s), less the time the burst took.
    assert 60.0 - elapsed - SLACK <= refused.retry_after <= 60.0
    assert refused.states[0].remaining == 0 and 3600.0 - elapsed - SLACK <= refused.states[0].reset <= 3600.0


@pytest.mark.asyncio
async def test_a_unit_comes_back_exactly_when_retry_after_says(limiter: RedisLimiter) -> None:
    interval = 2.0  # one unit back every 2 s: far longer than a burst of round trips takes, loaded or not
    checks = [("provider:openai", Rule("requests", 10, 10 * interval, "requests-burst"))]
    assert await take(limiter, checks, 10) == [True] * 10
    for _ in range(3):
        asked = time.monotonic()
        refused = await limiter.acquire(checks, 0)
        assert not refused.allowed and 0.0 < refused.retry_after <= interval
        await asyncio.sleep(refused.retry_after + SLACK)  # the wait itself is what is tested
        assert (await limiter.acquire(checks, 0)).allowed
    again = await limiter.acquire(checks, 0)
    # The unit granted last was due at (refusal time + its retry_after); the next one is due a whole
    # interval after that, so `again` waits an interval less the time past that due point: at most
    # this much, measured around the calls (the sleep's overshoot on a loaded machine included).
    late = time.monotonic() - asked - refused.retry_after
    assert not again.allowed
    assert interval - late - SLACK <= again.retry_after <= interval


@pytest.mark.asyncio
async def test_all_or_nothing_across_scopes_and_the_longest_wait(limiter: RedisLimiter) -> None:
    provider = ("provider:openai", Rule("requests", 10, 60))
    caller = ("caller:openai/10.0.0.5", Rule("requests", 1, 60))
    hourly = ("upstream:openai/key-a", Rule("requests", 2, 3600))
    slots = ("upstream:openai/key-a", Rule("concurrent", 5))
    began = time.monotonic()
    assert (await limiter.acquire([provider, caller, hourly, slots], 0)).allowed
    assert (await limiter.acquire([hourly], 0)).allowed
    refused = await limiter.acquire([provider, caller, hourly, slots], 0)
    elapsed = time.monotonic() - began
    assert not refused.allowed and refused.lease is None
    assert refused.refused_by == "upstream:openai/key-a requests-hour"
    assert 1800.0 - elapsed - SLACK <= refused.retry_after <= 1800.0  # not the caller's 60 s: the longest wait
    assert [s.remaining for s in refused.states] == [9, 0, 0, 4]  # as before the refused request
    # Nothing was taken: 9 requests and 4 slots are left.
    assert await take(limiter, [provider, slots], 5) == [True] * 4 + [False]
    assert await take(limiter, [provider], 6) == [True] * 5 + [False]


@pytest.mark.asyncio
async def test_tokens_reserved_then_reconciled_both_ways(limiter: RedisLimiter) -> None:
    checks = [("provider:openai", Rule("tokens", 1000, 60)), ("provider:openai", Rule("requests", 60, 60))]
    began = time.monotonic()
    assert (await limiter.acquire(checks, 600)).allowed
    assert not (await limiter.acquire(checks, 600)).allowed
    await limiter.reconcile(checks, -300)
    allowed = await limiter.acquire(checks, 600)
    refill = (time.monotonic() - began) * 1000 / 60  # tokens back since the first grant, at most
    assert allowed.allowed and 99 <= allowed.states[0].remaining <= 100 + refill  # 100 left, plus what refilled
    await limiter.reconcile(checks, +500)  # 400 tokens of debt
    debt = await limiter.acquire(checks, 0)
    elapsed = time.monotonic() - began
    assert not debt.allowed and debt.refused_by == "provider:openai tokens-minute"
    assert 24.0 - elapsed - SLACK <= debt.retry_after <= 24.0  # 400 tokens at 1000 a minute, less what refilled
    assert 58 <= debt.states[1].remaining <= 58 + elapsed  # two requests taken; one a second comes back
    never = await limiter.acquire(checks, 1001)
    assert not never.allowed and never.retry_after == float("inf")


@pytest.mark.asyncio
async def test_three_sidecars_share_one_quota_exactly(redis_server: RedisServer) -> None:
    sidecars = [RedisLimiter.from_url(redis_server.url, timeout=5.0) for _ in range(3)]
    checks = [("provider:openai", Rule("requests", 100, 60))]
    try:
        verdicts = await asyncio.gather(*(sidecars[i % 3].acquire(checks, 0) for i in range(300)))
    finally:
        for sidecar in sidecars:
            await sidecar.aclose()
    assert sum(v.allowed for v in verdicts) == 100
    assert sum(s.statistics()["allowed"] for s in sidecars) == 100


@pytest.mark.asyncio
async def test_a_dead_holders_lease_expires(redis_server: RedisServer, raw: Redis) -> None:
    short = RedisLimiter.from_url(redis_server.url, timeout=GENEROUS, lease_ttl=LEASE)
    checks = [("upstream:openai/key-a", Rule("concurrent", 1))]
    try:
        began = time.monotonic()
        held = await short.acquire(checks, 0)  # and its holder dies: no release, no refresh
        assert held.allowed and held.lease and held.states[0].remaining == 0
        assert 0 < await raw.pttl(f"{PREFIX}upstream:openai/key-a:concurrent") <= LEASE * 1000
        busy = await short.acquire(checks, 0)
        assert (busy.allowed, busy.retry_after) == (False, CONCURRENT_RETRY_AFTER)
        # Refused until the lease expires, then granted: polled (a refusal takes nothing).
        while not (await short.acquire(checks, 0)).allowed:
            assert time.monotonic() - began < LEASE + 60, "the dead holder's lease never expired"
            await asyncio.sleep(0.05)
        assert time.monotonic() - began >= LEASE - SLACK  # not before the lease ran out
    finally:
        await short.aclose()


@pytest.mark.asyncio
async def test_refresh_keeps_a_slot_and_release_returns_it(redis_server: RedisServer) -> None:
    short = RedisLimiter.from_url(redis_server.url, timeout=GENEROUS, lease_ttl=LEASE)
    tokens = Rule("tokens", 1000, 60)
    checks = [("upstream:openai/key-a", Rule("concurrent", 1)), ("upstream:openai/key-a", tokens)]
    try:
        held = await short.acquire(checks, 500)
        assert held.lease is not None
        began = time.monotonic()
        for _ in range(5):  # a refresh every LEASE / 4: each lands well inside the lease, loaded or not
            await asyncio.sleep(LEASE / 4)
            assert await short.refresh(checks, held.lease) == 1
        assert time.monotonic() - began > LEASE  # so only the refreshes can have kept it
        assert not (await short.acquire(checks, 0)).allowed  # still held
        await short.release(checks, held.lease, token_delta=-400)  # one call: the slot and 400 tokens back
        after = await short.acquire(checks, 900)
        assert after.allowed and after.states[1].remaining <= 100
        await asyncio.sleep(LEASE + 0.05)  # past the lease's TTL on Redis's clock (only a longer wait is possible)
        assert await short.refresh(checks, after.lease or "") == 0  # expired: not revived
    finally:
        await short.aclose()


@pytest.mark.asyncio
async def test_a_piggybacked_settle_the_server_has_not_seen_counts_the_acquire_once(
    limiter: RedisLimiter, raw: Redis
) -> None:
    """The first acquire to carry finished requests' releases: the settle script is not yet in
    Redis's script cache (NOSCRIPT) while the acquire script is, and ran. Only the settle may be
    sent again; sending the whole pipeline again counted the acquire twice (a request lost)."""
    checks = [("provider:openai", Rule("requests", 10, 3600)), ("provider:openai", Rule("concurrent", 5))]
    first = await limiter.acquire(checks, 0)  # loads the acquire script only
    assert first.allowed and first.states[0].remaining == 9
    assert await raw.script_exists(limiter._settle.sha) == [False]
    second = await limiter.acquire(checks, 0, settles=[(checks, first.lease, 0)])
    assert second.allowed and second.states[0].remaining == 8 and second.states[1].remaining == 3
    third = await limiter.acquire(checks, 0)
    assert third.states[0].remaining == 7  # one unit per request, none lost to a re-send
    assert third.states[1].remaining == 3  # the first lease went back: the second and this one held
    await raw.script_flush()  # Redis restarted, say: both scripts gone; the pipeline recovers
    fourth = await limiter.acquire(checks, 0, settles=[(checks, second.lease, 0)])
    assert fourth.allowed and fourth.states[0].remaining == 6


@pytest.mark.asyncio
async def test_keys_are_prefixed_and_expire_when_idle(limiter: RedisLimiter, raw: Redis) -> None:
    rule = Rule("requests", 4, 4.0, "requests-short")
    await take(limiter, [("caller:openai/10.0.0.5", rule)], 2)
    key = f"{PREFIX}caller:openai/10.0.0.5:requests-short"
    presence = f"{PREFIX}sidecars"
    assert sorted(await raw.keys("*")) == [key, presence]
    assert 0 < await raw.pttl(key) <= 2002  # full again 2 s after the last grant
    assert await raw.hget(key, "span") == "4000000"
    assert 60_000 < await raw.pttl(presence) <= 120_000  # a minute of presence, and a margin
    deadline = time.monotonic() + 60
    while await raw.keys("*") != [presence]:  # gone once full again (Redis expires keys lazily and every 100 ms)
        assert time.monotonic() < deadline, "the idle key never expired"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_each_acquire_counts_the_sidecars_seen_in_the_last_minute(redis_server: RedisServer, raw: Redis) -> None:
    limiters = [RedisLimiter.from_url(redis_server.url, timeout=GENEROUS) for _ in range(3)]
    checks = [("provider:openai", Rule("requests", 100, 60))]
    try:
        assert [lim.sidecars for lim in limiters] == [1, 1, 1]  # none seen yet: a whole share
        for lim in limiters:
            await lim.acquire(checks, 0)
        assert [lim.sidecars for lim in limiters] == [1, 2, 3]  # each saw those before it and itself
        await limiters[0].acquire(checks, 0, settles=[(checks, None, 0)])  # the pipelined path too
        assert limiters[0].sidecars == 3
        ids = {lim.sidecar_id for lim in limiters}
        assert set(await raw.zrange(f"{PREFIX}sidecars", 0, -1)) == ids
        # A sidecar last seen more than a minute ago (Redis time) no longer counts.
        await raw.zadd(f"{PREFIX}sidecars", {limiters[2].sidecar_id: 1})
        await limiters[0].acquire(checks, 0)
        assert limiters[0].sidecars == 2
    finally:
        for lim in limiters:
            await lim.aclose()


@pytest.mark.asyncio
async def test_redis_down_raises_limiter_unavailable_then_recovers(redis_server: RedisServer) -> None:
    limiter = RedisLimiter.from_url(redis_server.url, timeout=GENEROUS)
    checks = [("provider:openai", Rule("requests", 100, 60))]
    try:
        assert (await limiter.acquire(checks, 0)).allowed
        redis_server.kill()
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable, match=r"^redis unavailable \(connection error\)$"):
            await limiter.acquire(checks, 0)  # the pooled connection was closed under it
        with pytest.raises(LimiterUnavailable, match=r"^redis unavailable \(connection refused\)$") as caught:
            await limiter.acquire(checks, 0)  # a new connection: nobody listens on the port
        assert caught.value.reason == "connection refused"
        assert time.monotonic() - started < GENEROUS / 2  # refused at once: not a wait for the timeout
        redis_server.start()  # the same port, an empty Redis without the scripts
        assert (await limiter.acquire(checks, 0)).allowed  # the same object reconnects on its own
        assert {k: v for k, v in limiter.statistics().items() if k != "round_trips"} == {
            "allowed": 2,
            "refused": 0,
            "unavailable": 2,
        }
        assert repr(limiter) == "RedisLimiter(prefix='sidekey:rl:', allowed=2, refused=0, unavailable=2)"
    finally:
        await limiter.aclose()


@pytest.mark.asyncio
async def test_a_redis_that_stops_answering_times_out(redis_server: RedisServer, limiter: RedisLimiter) -> None:
    checks = [("provider:openai", Rule("requests", 100, 60))]
    assert (await limiter.acquire(checks, 0)).allowed
    short = RedisLimiter(limiter.client, timeout=TIMEOUT)  # the same connections, a short timeout
    redis_server.pause()
    try:
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable, match=r"^redis unavailable \(timeout\)$") as caught:
            await short.acquire(checks, 0)
        assert caught.value.reason == "timeout" and caught.value.elapsed >= TIMEOUT - 0.01
        # Not before the timeout; and it did time out rather than hang (Redis stays paused until
        # resumed below), however late a loaded machine wakes the loop once the timeout fires.
        assert TIMEOUT - 0.01 < time.monotonic() - started < GENEROUS
    finally:
        redis_server.resume()
    assert (await limiter.acquire(checks, 0)).allowed


@pytest.mark.asyncio
async def test_a_cost_no_window_can_hold_is_refused_for_ever_not_for_a_second(limiter: RedisLimiter) -> None:
    """Issue #16 item 5 through Redis: ``tokens_per_minute: 60`` and a chat without max_tokens
    (5,000 reserved) is an infinite wait, which the limits addon answers 413 request_over_limit
    (a finite one would be 429 Retry-After: 1, looping an obedient client for ever)."""
    checks = [("provider:p", Rule("tokens", 60, 60.0, "tokens-minute"))]
    verdict = await limiter.acquire(checks, 5000)
    assert not verdict.allowed and verdict.retry_after == float("inf")
    assert verdict.refused_by == "provider:p tokens-minute"
    assert (await limiter.acquire(checks, 60)).allowed  # the refusal took nothing
