"""Shared limits while Redis is out of reach or this sidekey is starved of CPU: each sidecar
falls back to its share of the limit only, says why, and counts shared again once Redis answers.
Real redis-server (a free port), real sidekey processes, curl, CPU burners."""

from __future__ import annotations

import asyncio
import logging
import math
import re
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
from prometheus_client.parser import text_string_to_metric_families

from addons.limits.addon import Limits
from addons.limits.checks import Checks
from addons.limits.redis_limiter import RedisLimiter
from proxy.policy.rates import Rule
from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import fake_provider, policy_for
from tests.integration.sidekey_process import SidekeyProcess
from tests.integration.test_limits import chat
from tests.redis_server import RedisServer

LIMIT = 30  # requests per hour, shared by three sidecars (per hour: see the bound in the test)
PERIOD = 3600.0
SIDECARS = 3
SHARE = LIMIT // SIDECARS
FALLBACK = re.compile(
    r"redis unreachable \((timeout after \d+ ms with loop lag \d+ ms|connection refused|connection error)\): "
    r"limits fall back to this process's share, 1/3 of each limit \(3 sidecars seen in the last minute\)"
)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def degraded_seconds(proxy: SidekeyProcess) -> float:
    text = httpx.get(proxy.admin_url + "/metrics", trust_env=False).text
    values = [s.value for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "sidekey_limits_degraded_seconds_total"]  # fmt: skip
    assert len(values) == 1, values
    return values[0]


def test_three_loaded_sidecars_admit_at_most_the_limit_plus_a_share_each_while_redis_sleeps(
    start_sidekey: object, fake: FakeProviderThread, redis: RedisServer
) -> None:
    # The default 500 ms Redis timeout: the setting that let 43-53 of 30 through in issue #16.
    extra = fake_provider(fake, "limited", "limited.test", limits=f"{{requests_per_hour: {LIMIT}}}", queue_wait="0")
    policy = policy_for(fake, extra=extra, limits=f"redis: {{url: '{redis.url}', on_failure: open, timeout: 500ms}}")
    proxies: list[SidekeyProcess] = [start_sidekey(policy) for _ in range(SIDECARS)]  # type: ignore[operator]
    burners = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(2)]  # both cores busy
    began = time.monotonic()  # before the first request: the span the refill term below is taken over
    try:
        # Two rounds: each sidecar has then seen all three in Redis, so its share is a third.
        assert [chat(proxies[i % SIDECARS])[0] for i in range(2 * SIDECARS)] == [200] * (2 * SIDECARS)
        sleeper = threading.Thread(target=redis.debug_sleep, args=(4.0,))
        sleeper.start()
        deadline = time.monotonic() + 10
        while redis.ping(timeout=0.2):  # until Redis is asleep
            assert time.monotonic() < deadline, "DEBUG SLEEP did not start"
        with ThreadPoolExecutor(24) as pool:  # during the sleep, and on after it
            statuses = list(pool.map(lambda i: chat(proxies[i % SIDECARS])[0], range(90)))
        sleeper.join(timeout=30)
        assert not sleeper.is_alive()
        # Redis awake: the shared count again (the calls that timed out ran when it woke, and count)
        statuses += [chat(proxies[i % SIDECARS])[0] for i in range(2 * SIDECARS)]
        span = time.monotonic() - began  # after the last answer
    finally:
        for burner in burners:
            burner.kill()
            burner.wait()
    allowed = 2 * SIDECARS + statuses.count(200)
    reached = len([r for r in fake.received if r.path == "/v1/chat/completions"])
    assert allowed == reached
    assert set(statuses) <= {200, 429}, sorted(set(statuses))
    # The bound. Both limiters are GCRA with a burst of the whole quota (addons/limits/arithmetic.py):
    # a rule of n per PERIOD grants at most n + t * n / PERIOD over any t seconds; the refill is a
    # real term. Redis counts one rule of LIMIT for all three sidecars (a call that timed out and
    # ran when Redis woke only adds to its count, never grants); alone, each sidecar counts a rule
    # of SHARE per PERIOD, the same local state across its outages. Over the test's span t:
    #     allowed <= LIMIT + SIDECARS * SHARE + t * (LIMIT + SIDECARS * SHARE) / PERIOD
    # With requests_per_minute (as before) the last term is t itself: t was 10.8 s when 61 of a
    # bound of 60 were let through on a loaded machine, a refill of up to 10 more, not an
    # over-grant. Per hour it is t / 60, under one for any run shorter than a minute, so the bound
    # stays the limit plus a share each. Before the fix each sidecar fell back to the whole limit:
    # 30 + 3 * 30 possible, and more than 60 reached here.
    refill = math.floor(span * (LIMIT + SIDECARS * SHARE) / PERIOD)
    print(f"admitted {allowed} of {2 * SIDECARS + len(statuses)} in {span:.1f} s")  # for the record (-s)
    assert allowed <= LIMIT + SIDECARS * SHARE + refill, (allowed, span)
    assert statuses.count(429) > 0
    logs = {proxy: proxy.log() for proxy in proxies}
    fell_back = [proxy for proxy, log in logs.items() if "sidekey.limits: redis unreachable" in log]
    assert fell_back, "no sidecar saw Redis asleep"
    for proxy in fell_back:
        lines = [line for line in logs[proxy].splitlines() if "sidekey.limits: redis unreachable" in line]
        assert all(FALLBACK.search(line) for line in lines), lines  # why, and the share
        # Once per outage (a loaded machine may see two), each ended by Redis answering again.
        assert logs[proxy].count("redis reachable again: limits are shared") == len(lines), lines
        assert 0 < degraded_seconds(proxy) < 60


# -- the Limits addon on a real Redis: a lagging loop is not an outage ----------------------------

TIMEOUT = 1.0


@pytest_asyncio.fixture
async def limiter(redis: RedisServer) -> AsyncIterator[RedisLimiter]:
    limiter = RedisLimiter.from_url(redis.url, timeout=TIMEOUT)
    yield limiter
    await limiter.aclose()


def shared_addon(limiter: RedisLimiter) -> Limits:
    addon = Limits()
    addon.shared = limiter
    return addon


async def acquire_while_paused(addon: Limits, redis: RedisServer, checks: tuple[tuple[str, Rule], ...]) -> bool:
    """Acquire while Redis is stopped for 1.4 s: the first try times out (1 s), a retry lands."""
    redis.pause()
    resume = asyncio.get_running_loop().call_later(1.4, redis.resume)
    try:
        verdict, _ = await addon._acquire(Checks(checks), 0)
    finally:
        resume.cancel()
        redis.resume()
    return verdict.allowed


@pytest.mark.asyncio
async def test_a_timeout_while_the_loop_lags_is_retried_not_an_outage(
    limiter: RedisLimiter, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    addon = shared_addon(limiter)
    checks = (("provider:openai", Rule("requests", 3, 60.0)),)
    addon.degraded.lag.observe(0.4, addon.clock())  # the loop woke 400 ms late: 40% of the timeout
    with caplog.at_level(logging.ERROR, logger="sidekey.limits"):
        assert await acquire_while_paused(addon, redis, checks)
    assert addon.counters["lag_retries"] == 1 and addon.counters["redis_fallbacks"] == 0
    assert not addon.degraded.active and "redis unreachable" not in caplog.text
    assert limiter.statistics()["allowed"] == 1  # counted in Redis, not locally


@pytest.mark.asyncio
async def test_a_timeout_on_a_quiet_loop_falls_back_to_the_share_and_says_why(
    limiter: RedisLimiter, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    addon = shared_addon(limiter)
    checks = (("provider:openai", Rule("requests", 6, 60.0)),)
    others = [RedisLimiter.from_url(redis.url, timeout=TIMEOUT) for _ in range(2)]
    try:
        for other in others:  # two more sidecars, seen alive in Redis
            await other.acquire(checks, 0)
    finally:
        for other in others:
            await other.aclose()
    assert (await addon._acquire(Checks(checks), 0))[0].allowed
    assert limiter.sidecars == 3
    with caplog.at_level(logging.ERROR, logger="sidekey.limits"):
        assert await acquire_while_paused(addon, redis, checks)  # alone: the share, 6 // 3 = 2
    assert addon.counters["lag_retries"] == 0 and addon.counters["redis_fallbacks"] == 1 and addon.degraded.active
    assert re.search(r"redis unreachable \(timeout after \d+ ms with loop lag \d+ ms\): limits fall back to this "
                     r"process's share, 1/3 of each limit", caplog.text)  # fmt: skip
    verdict, limiter_used = await addon._acquire(Checks(checks), 0)
    assert verdict.allowed and limiter_used is limiter  # Redis answers: shared again at once
    # 2 others + 1 + the timed-out call, which Redis ran when it woke (never an over-grant) + this one
    assert verdict.states[0].remaining == 6 - 5
    assert not addon.degraded.active and addon.statistics()["degraded_seconds"] > 0


@pytest.mark.asyncio
async def test_redis_down_admits_only_the_share_then_counts_shared_again(
    limiter: RedisLimiter, redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    addon = shared_addon(limiter)
    checks = Checks((("provider:openai", Rule("requests", 7, 60.0)),))
    other = RedisLimiter.from_url(redis.url, timeout=TIMEOUT)
    try:
        await other.acquire(checks.pairs, 0)  # a second sidecar
    finally:
        await other.aclose()
    assert (await addon._acquire(checks, 0))[0].allowed and limiter.sidecars == 2
    redis.kill()
    with caplog.at_level(logging.ERROR, logger="sidekey.limits"):
        local = [(await addon._acquire(checks, 0))[0] for _ in range(5)]
    assert [v.allowed for v in local] == [True, True, True, False, False]  # 7 // 2 = 3 alone
    assert local[3].states[0].limit == 3 and local[3].retry_after > 0
    assert caplog.text.count("redis unreachable") == 1  # once per outage
    assert re.search(r"redis unreachable \(connection (error|refused)\): limits fall back to this process's share, "
                     r"1/2 of each limit \(2 sidecars seen in the last minute\)", caplog.text)  # fmt: skip
    assert addon.degraded.active and addon.statistics()["shared"] is False
    redis.start()
    verdict, used = await addon._acquire(checks, 0)
    assert verdict.allowed and used is limiter  # counted in Redis again
    assert verdict.states[0].remaining == 7 - 1  # a restarted Redis forgot the counts: the first again
    assert not addon.degraded.active and addon.statistics()["shared"] is True
