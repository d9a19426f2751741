"""Limits through real sidekey processes; shared limits through a real Redis
(started by the test on a free port)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from addons.usage.tokens import reservation
from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import OPENAI_KEY, curl, fake_provider, policy_for
from tests.integration.sidekey_process import SidekeyProcess
from tests.redis_server import RedisServer

CHAT = json.dumps({"model": "gpt-4o-mini", "max_tokens": 40, "messages": [{"role": "user", "content": "hello"}]})


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path).start()
    yield server
    server.stop()


def chat(proxy: SidekeyProcess, host: str = "limited.test") -> tuple[int, str]:
    result = curl(proxy, "-s", "-i", "-H", "content-type: application/json", "-d", CHAT,
                  f"https://{host}/v1/chat/completions")  # fmt: skip
    status = int(result.stdout.split(" ", 2)[1]) if result.stdout.startswith("HTTP/") else 0
    return status, result.stdout


def test_limit_answers_429_with_headers_then_recovers(start_sidekey: object, fake: FakeProviderThread) -> None:
    # Two a minute: a unit comes back every 30 s, so the three requests below fall in one refill
    # interval however slow the machine (with two a second, three curl runs had to fit in 0.5 s).
    extra = fake_provider(fake, "limited", "limited.test", limits="{requests_per_minute: 2}", queue_wait="0")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    statuses = [chat(proxy) for _ in range(3)]
    assert [s for s, _ in statuses] == [200, 200, 429]
    ok, refused = statuses[0][1].lower(), statuses[2][1]
    assert "x-ratelimit-limit-requests-minute: 2" in ok and "x-ratelimit-remaining-requests-minute: 1" in ok
    assert '"rate_limited"' in refused
    # Retry-After: the rest of the 30 s interval, rounded up.
    [retry_after] = [line.split(":")[1] for line in refused.lower().splitlines() if line.startswith("retry-after:")]
    assert 1 <= int(retry_after) <= 30
    assert "x-sidekey-request-id" in refused.lower()
    assert len([r for r in fake.received if r.path == "/v1/chat/completions"]) == 2  # the third never left
    fake.provider.throttled_keys.add(OPENAI_KEY)  # now the provider refuses too
    assert chat(proxy, "api.openai.com")[0] == 429
    metrics = httpx.get(proxy.admin_url + "/metrics", trust_env=False).text
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(metrics)
               for s in f.samples}  # fmt: skip
    assert samples[("sidekey_rate_limited_total", (("provider", "limited"), ("source", "sidekey")))] == 1
    assert samples[("sidekey_rate_limited_total", (("provider", "openai"), ("source", "upstream")))] == 1


def shared_policy(fake: FakeProviderThread, redis: RedisServer, limits: str, on_failure: str = "open") -> str:
    extra = fake_provider(fake, "limited", "limited.test", limits=limits, queue_wait="0")
    # A generous Redis timeout: on a loaded test machine a 0.5 s call can time out and fall back
    # to local limits (or, on_failure closed, refuse), which is not what these tests measure. A killed
    # Redis refuses connections at once, so the timeout never slows the tests that kill it.
    redis_config = f"redis: {{url: '{redis.url}', on_failure: {on_failure}, timeout: 10s}}"
    return policy_for(fake, extra=extra, limits=redis_config)


def test_three_sidecars_share_one_quota(start_sidekey: object, fake: FakeProviderThread, redis: RedisServer) -> None:
    policy = shared_policy(fake, redis, "{requests_per_hour: 30, concurrent: 64}")
    proxies = [start_sidekey(policy) for _ in range(3)]  # type: ignore[operator]
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda i: chat(proxies[i % 3])[0], range(90)))
    allowed = results.count(200)
    reached = len([r for r in fake.received if r.path == "/v1/chat/completions"])
    # Measured overshoot: zero. Without sharing each process would let 30 through (90 in all).
    assert allowed == reached == 30, (allowed, reached, sorted(set(results)))
    assert results.count(429) == 60
    # Every sidecar served some of the 30, and refused the rest: the quota is one.
    assert all(200 in results[i::3] for i in range(3))


def test_three_sidecars_share_a_token_quota(
    start_sidekey: object, fake: FakeProviderThread, redis: RedisServer
) -> None:
    # Each request reserves its estimate (body bytes / 4 + max_tokens 40) before it is sent;
    # when its answer reports usage, the unused part of the reservation is given back.
    policy = shared_policy(fake, redis, "{tokens_per_minute: 500}")
    proxies = [start_sidekey(policy) for _ in range(3)]  # type: ignore[operator]
    began = time.monotonic()
    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(lambda i: chat(proxies[i % 3]), range(60)))
    refill = (time.monotonic() - began) * 500 / 60  # the bucket refills while the burst runs
    served = [json.loads(text.split("\n\n", 1)[1]) for status, text in results if status == 200]
    sent = [r for r in fake.received if r.path == "/v1/chat/completions"]
    assert len(served) == len(sent) and 0 < len(served) < 60
    used = sum(s["usage"]["total_tokens"] for s in served)
    reserved = reservation(CHAT.encode(), len(CHAT))
    # What was consumed fits the quota plus what refilled meanwhile (overshoot 0),
    # and the last refusal was right: one more reservation would not have fit.
    assert used <= 500 + refill, (used, refill)
    assert used + reserved > 500 - 24 * reserved  # refused only once the quota was (nearly) spent
    assert 429 in [status for status, _ in results]


@pytest.mark.parametrize("on_failure", ["open", "closed"])
def test_redis_killed_and_restarted(
    start_sidekey: object, fake: FakeProviderThread, redis: RedisServer, on_failure: str
) -> None:
    proxy = start_sidekey(shared_policy(fake, redis, "{requests_per_minute: 1000}", on_failure))  # type: ignore[operator]
    assert chat(proxy)[0] == 200
    redis.kill()
    status, text = chat(proxy)
    if on_failure == "open":
        assert status == 200  # limits fall back to this process; serving goes on
    else:
        assert status == 503 and '"limits_unavailable"' in text
    redis.restart()
    assert chat(proxy)[0] == 200  # reconnected on its own
    assert proxy.proc.poll() is None


def test_key_pool_spreads_by_each_keys_own_quota(start_sidekey: object, fake: FakeProviderThread) -> None:
    extra = fake_provider(fake, "limited", "limited.test", queue_wait="0") + (
        "    upstreams:\n"
        "      - {name: key-a, secret: env:OPENAI_API_KEY, limits: {requests_per_hour: 2}}\n"
        "      - {name: key-b, secret: env:ANTHROPIC_API_KEY, limits: {requests_per_hour: 1}}\n"
    )
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    answers = [chat(proxy) for _ in range(4)]
    served = [next(line.split(": ")[1] for line in text.lower().splitlines() if line.startswith("x-sidekey-upstream"))
              for status, text in answers[:3] if status == 200]  # fmt: skip
    assert sorted(served) == ["key-a", "key-a", "key-b"]  # each key up to its own quota
    status, text = answers[3]
    assert status == 429 and '"rate_limited"' in text and "upstream limit" in text  # ours, not the provider's
    assert len([r for r in fake.received if r.path == "/v1/chat/completions"]) == 3


@pytest.mark.asyncio
async def test_one_redis_round_trip_per_request(redis: RedisServer) -> None:
    """The acquire is the only round trip on a request's path; releases and
    token reconciles of finished requests go in batched pipelines."""
    import asyncio
    import dataclasses

    from addons.limits import Limits
    from addons.usage.tokens import Usage
    from proxy.flow import Response
    from proxy.policy import Policy, RedisConfig
    from proxy.policy.rates import Rule
    from proxy.redis_client import connect
    from proxy.testing import make_flow, make_provider

    rules = (Rule("requests", 100000, 60.0), Rule("tokens", 10**8, 60.0), Rule("concurrent", 64))
    provider = dataclasses.replace(make_provider(), limits=rules)
    # Generous Redis timeouts: a timed-out call falls back to local limits and would change the count.
    client = connect(redis.url, 10.0)
    addon = Limits()

    class Runtime:  # what setup() keeps and configure() reads
        pass

    runtime = Runtime()
    runtime.redis = client  # type: ignore[attr-defined]
    addon.setup(runtime)  # type: ignore[arg-type]
    addon.configure(Policy(providers=(provider,), redis=RedisConfig(redis.url, timeout=10.0)))
    addon.running()
    assert addon.shared is not None

    async def one() -> None:
        flow = make_flow(provider, body=CHAT.encode())
        pending = addon.request(flow)
        assert pending is not None
        await pending
        assert flow.response is None, flow.response.body
        flow.response = Response(200)
        flow.metadata["usage"] = Usage(input=10, output=5)
        addon.response(flow)

    async def worker() -> None:  # steady traffic: 20 callers, 10 requests each
        for _ in range(10):
            await one()

    await asyncio.gather(*(worker() for _ in range(20)))
    # Let the settle task send what finished last: nothing pending, every lease back in Redis.
    # (Polled: a fixed sleep could end with a release still in flight, which done() then cancels.)
    deadline = time.monotonic() + 60
    while addon._pending or await_in_flight(redis):
        assert time.monotonic() < deadline, f"releases not settled: {addon._pending}"
        await asyncio.sleep(0.01)
    trips = addon.shared.round_trips
    await addon.done()
    await client.aclose()
    # 200 acquires, each carrying the releases finished before it; only the
    # 20 callers' last releases (no acquire came after them) were sent alone.
    assert 200 < trips <= 200 + 20 + 5, trips
    assert await_in_flight(redis) == 0


def await_in_flight(redis: RedisServer) -> int:
    """Concurrency leases still held in Redis (all were released)."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis.url)
    try:
        return sum(client.zcard(k) for k in client.scan_iter("sidekey:rl:*concurrent*"))
    finally:
        client.close()


@pytest.mark.parametrize("wire", ["openai", "anthropic"])
def test_token_reservation_reconciled_from_a_real_stream(
    start_sidekey: object, fake: FakeProviderThread, monkeypatch: pytest.MonkeyPatch, wire: str
) -> None:
    """A stream reserves prompt + max_tokens; once its usage arrives (OpenAI's
    final chunk, Anthropic's message_start/message_delta) the unused part is
    given back, which the next answer's remaining-tokens header shows."""
    import anthropic
    import openai

    auth = "{type: header, header: x-api-key, secret: env:ANTHROPIC_API_KEY}" if wire == "anthropic" else None
    fields = {"limits": "{tokens_per_day: 100000}", "queue_wait": "0"}
    if auth:
        fields["auth"] = auth
        fields["set_headers"] = '{anthropic-version: "2023-06-01"}'
    extra = fake_provider(fake, "metered", "metered.test", **fields)
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    http = httpx.Client(proxy=proxy.url, verify=proxy.client_ssl_context(), trust_env=False)
    remaining = []
    with http:
        for _ in range(2):
            if wire == "openai":
                client = openai.OpenAI(api_key="placeholder", base_url="https://metered.test/v1", http_client=http)  # type: ignore[arg-type]  # the openai SDK annotates httpx2.Client; an httpx.Client serves
                with client.chat.completions.with_streaming_response.create(
                    model="gpt-4o-mini", max_tokens=2000, messages=[{"role": "user", "content": "hi"}],
                    stream=True, stream_options={"include_usage": True},
                ) as resp:  # fmt: skip
                    used = [c.usage for c in resp.parse() if c.usage][-1].total_tokens
                    remaining.append(int(resp.headers["x-ratelimit-remaining-tokens-day"]))
            else:
                monkeypatch.setenv("HTTPS_PROXY", proxy.url)
                monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_path))
                client2 = anthropic.Anthropic(api_key="placeholder", base_url="https://metered.test", max_retries=0)
                with client2, client2.messages.with_streaming_response.create(
                    model="claude-sonnet-4-20250514", max_tokens=2000, messages=[{"role": "user", "content": "hi"}],
                    stream=True,
                ) as resp2:  # fmt: skip
                    events = list(resp2.parse())
                    start = next(e for e in events if e.type == "message_start").message.usage
                    delta = [e for e in events if e.type == "message_delta"][-1].usage
                    used = start.input_tokens + delta.output_tokens
                    remaining.append(int(resp2.headers["x-ratelimit-remaining-tokens-day"]))
    # The first answer's header counts its whole reservation (>= 2000); by the
    # second request that reservation was replaced by what the stream used.
    first, second = remaining
    reserved = 100000 - first
    assert reserved >= 2000
    assert second == 100000 - used - reserved, (first, second, used)


UNCAPPED = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]})  # no max_tokens


def chat_body(proxy: SidekeyProcess, body: str, host: str = "limited.test") -> tuple[int, str]:
    result = curl(proxy, "-s", "-i", "-H", "content-type: application/json", "-d", body,
                  f"https://{host}/v1/chat/completions")  # fmt: skip
    status = int(result.stdout.split(" ", 2)[1]) if result.stdout.startswith("HTTP/") else 0
    return status, result.stdout


def test_a_request_that_can_never_fit_is_413_not_an_endless_429(
    start_sidekey: object, fake: FakeProviderThread
) -> None:
    """tokens_per_minute: 100 and no max_tokens: the reservation (> 4,096) is more
    than the whole quota, so no wait helps. Retry-After would loop a client forever."""
    extra = fake_provider(fake, "limited", "limited.test", limits="{tokens_per_minute: 100}", queue_wait="5")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    status, text = chat_body(proxy, UNCAPPED)
    assert status == 413, text
    head, _, body = text.partition("\n\n")  # curl -i; text mode folds CRLF
    assert "retry-after" not in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "request_over_limit" and error["retryable"] is False
    reserved = reservation(UNCAPPED.encode(), len(UNCAPPED))
    assert "tokens-minute" in error["message"] and f"{reserved} tokens" in error["message"]
    assert "max_tokens" in error["message"]
    assert chat_body(proxy, CHAT)[0] == 200  # a request that fits still goes (CHAT reserves 63)
    assert len([r for r in fake.received if r.path == "/v1/chat/completions"]) == 1


def test_a_key_too_small_for_one_request_is_skipped_not_retired(
    start_sidekey: object, fake: FakeProviderThread
) -> None:
    """A per-key token rule smaller than one request's reservation: that request
    goes to another key, and the small key keeps serving requests that fit."""
    extra = fake_provider(fake, "limited", "limited.test", queue_wait="0") + (
        "    balance: least_in_flight\n"
        "    upstreams:\n"
        "      - {name: key-small, secret: env:OPENAI_API_KEY, priority: 0, limits: {tokens_per_minute: 100}}\n"
        "      - {name: key-big, secret: env:ANTHROPIC_API_KEY, priority: 1}\n"
    )
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    big_status, big = chat_body(proxy, UNCAPPED)
    assert big_status == 200 and "x-sidekey-upstream: key-big" in big.lower()
    small_status, small = chat_body(proxy, CHAT)
    assert small_status == 200 and "x-sidekey-upstream: key-small" in small.lower()


def test_every_key_too_small_is_413(start_sidekey: object, fake: FakeProviderThread) -> None:
    extra = fake_provider(fake, "limited", "limited.test", queue_wait="0") + (
        "    upstreams:\n"
        "      - {name: key-a, secret: env:OPENAI_API_KEY, priority: 0, limits: {tokens_per_minute: 80}}\n"
        "      - {name: key-b, secret: env:ANTHROPIC_API_KEY, priority: 1, limits: {tokens_per_minute: 100}}\n"
    )
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    status, text = chat_body(proxy, UNCAPPED)
    assert status == 413 and '"request_over_limit"' in text, text
    status, text = chat_body(proxy, CHAT)  # 63 tokens fit key-a, the first choice: it was not retired
    assert status == 200 and "x-sidekey-upstream: key-a" in text.lower()
