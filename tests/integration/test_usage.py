"""Usage and cost through real sidekey processes: the official SDKs against the
fake provider, ``GET /usage`` and ``/metrics`` on the admin port, budgets from
the policy, and the ledger shared through a real Redis (restarts, two
sidecars). The fake counts words as tokens: "say hello to me" is 4 input
tokens, "Hello from fake openai" 4 output tokens."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
import pytest_asyncio
from redis.asyncio import Redis

from addons import default_addons
from addons.usage import UsageMeter
from addons.usage.ledger import Ledger
from addons.usage.redis_ledger import PREFIX, RedisLedger
from addons.usage.tokens import Usage
from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import PLACEHOLDER, assert_no_secret, curl, fake_provider, policy_for
from tests.integration.polling import wait_for
from tests.integration.sidekey_process import SidekeyProcess
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the redis_server fixture

# Until the usage addon is in default_addons, load it once (two instances would count twice).
IN_DEFAULTS = any(isinstance(a, UsageMeter) for a in default_addons())
ARGS = () if IN_DEFAULTS else ("--addon", "addons.usage:UsageMeter")
MESSAGES: list[Any] = [{"role": "user", "content": "say hello to me"}]  # each SDK types them as its own TypedDicts
CHAT = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
Start = Callable[..., SidekeyProcess]


def admin(proxy: SidekeyProcess, path: str) -> httpx.Response:
    return httpx.get(proxy.admin_url + path, timeout=30, trust_env=False)


def usage(proxy: SidekeyProcess, query: str = "") -> dict[str, Any]:
    response = admin(proxy, "/usage" + query)
    assert response.status_code == 200, response.text
    assert_no_secret(response.text)
    body: dict[str, Any] = response.json()
    return body


def by_model(report: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(r["provider"], r["model"]): r for r in report["by"]}


def chat(proxy: SidekeyProcess, host: str = "api.openai.com") -> tuple[int, str]:
    result = curl(proxy, "-s", "-i", "-H", "content-type: application/json", "-d", CHAT,
                  f"https://{host}/v1/chat/completions")  # fmt: skip
    status = int(result.stdout.split(" ", 2)[1]) if result.stdout.startswith("HTTP/") else 0
    return status, result.stdout


@pytest.fixture
def proxy(start_sidekey: Start, fake: FakeProviderThread, monkeypatch: pytest.MonkeyPatch) -> SidekeyProcess:
    started = start_sidekey(policy_for(fake), args=ARGS)
    monkeypatch.setenv("HTTPS_PROXY", started.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(started.ca_path))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    return started


def test_sdk_calls_are_counted_and_priced(proxy: SidekeyProcess) -> None:
    with openai.OpenAI(api_key=PLACEHOLDER) as client:
        client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES)
        with_usage = client.chat.completions.create(
            model="gpt-4o",
            messages=MESSAGES,
            stream=True,
            stream_options={"include_usage": True},
        )
        assert list(with_usage)[-1].usage is not None
        without = client.chat.completions.create(model="gpt-4.1-mini", messages=MESSAGES, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in without if c.choices) == "Hello from fake openai"
    with anthropic.Anthropic(api_key=PLACEHOLDER) as aclient:
        with aclient.messages.stream(
            model="claude-sonnet-4-20250514", max_tokens=64, messages=[{"role": "user", "content": "hi there claude"}]
        ) as astream:
            assert "".join(astream.text_stream) == "Hello from fake anthropic"

    report = usage(proxy)
    rows = by_model(report)
    plain, streamed = rows[("openai", "gpt-4o-mini")], rows[("openai", "gpt-4o")]
    estimated, claude = rows[("openai", "gpt-4.1-mini")], rows[("anthropic", "claude-sonnet-4-20250514")]
    assert (plain["requests"], plain["input_tokens"], plain["output_tokens"], plain["estimated"]) == (1, 4, 4, 0)
    assert plain["cost_usd"] == pytest.approx((4 * 0.15 + 4 * 0.60) / 1e6)
    assert (streamed["input_tokens"], streamed["output_tokens"], streamed["estimated"]) == (4, 4, 0)
    assert streamed["cost_usd"] == pytest.approx((4 * 2.50 + 4 * 10.00) / 1e6)
    # no usage in the stream: the request's prompt estimate and the streamed text (22 bytes, ~6 tokens)
    assert (estimated["estimated"], estimated["output_tokens"]) == (1, 6) and estimated["input_tokens"] > 0
    assert (claude["input_tokens"], claude["output_tokens"], claude["estimated"]) == (3, 4, 0)
    assert claude["cost_usd"] == pytest.approx((3 * 3.00 + 4 * 15.00) / 1e6)
    assert all(r["upstream"] == "default" and r["caller"] == "127.0.0.1" for r in report["by"])
    assert report["shared"] is False and report["totals"]["requests"] == 4
    assert usage(proxy, "?provider=anthropic")["totals"]["requests"] == 1
    assert usage(proxy, f"?since={int(time.time()) + 2 * 86400}")["totals"]["requests"] == 0
    bad = admin(proxy, "/usage?since=soon")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_request" and "soon" not in bad.text

    if IN_DEFAULTS:  # the metrics addon reads the usage addon's results only when it runs after it
        metrics = admin(proxy, "/metrics").text
        assert 'sidekey_tokens_total{kind="input",model="gpt-4o-mini",provider="openai"} 4.0' in metrics
        assert 'sidekey_tokens_total{kind="output",model="claude-sonnet-4",provider="anthropic"} 4.0' in metrics
        assert 'sidekey_usage_estimated_total{provider="openai"} 1.0' in metrics
        assert 'sidekey_cost_usd_total{model="gpt-4o",provider="openai"}' in metrics
    assert_no_secret(admin(proxy, "/metrics").text + proxy.log())


def test_a_spent_budget_answers_429_until_the_day_ends(start_sidekey: Start, fake: FakeProviderThread) -> None:
    extra = fake_provider(fake, "capped", "capped.test", budget="{daily_usd: 0.000001}")
    proxy = start_sidekey(policy_for(fake, extra=extra), args=ARGS)
    assert chat(proxy, "capped.test")[0] == 200  # $0.000003: over the cap once counted
    status, text = chat(proxy, "capped.test")
    assert status == 429 and '"budget_exceeded"' in text
    retry_after = next(int(line.split(":")[1]) for line in text.lower().splitlines() if line.startswith("retry-after:"))
    assert 0 < retry_after <= 86400 and retry_after == pytest.approx(86400 - time.time() % 86400, abs=5)
    assert len([r for r in fake.received if r.path == "/v1/chat/completions"]) == 1
    assert chat(proxy)[0] == 200  # another provider has no budget
    assert usage(proxy, "?provider=capped")["totals"]["requests"] == 1  # the refusal never went upstream


def redis_policy(fake: FakeProviderThread, server: RedisServer) -> str:
    return policy_for(fake, limits=f"redis: {{url: '{server.url}'}}")


def test_usage_survives_a_restart_with_redis(start_sidekey: Start, fake: FakeProviderThread,
                                             redis_server: RedisServer) -> None:  # fmt: skip
    first = start_sidekey(redis_policy(fake, redis_server), args=ARGS)
    assert chat(first)[0] == 200 and chat(first)[0] == 200
    assert first.terminate() == 0  # the last counts are flushed on the way out
    second = start_sidekey(redis_policy(fake, redis_server), args=ARGS)
    report = usage(second)
    row = by_model(report)[("openai", "gpt-4o-mini")]
    assert report["shared"] is True and (row["requests"], row["input_tokens"], row["output_tokens"]) == (2, 8, 8)


def test_two_sidecars_see_the_combined_totals(start_sidekey: Start, fake: FakeProviderThread,
                                             redis_server: RedisServer) -> None:  # fmt: skip
    proxies = [start_sidekey(redis_policy(fake, redis_server), args=ARGS) for _ in range(2)]
    assert chat(proxies[0])[0] == 200
    assert chat(proxies[1])[0] == 200 and chat(proxies[1])[0] == 200

    def combined(p: SidekeyProcess) -> bool:
        return bool(usage(p)["totals"]["requests"] == 3)

    assert wait_for(lambda: combined(proxies[0]) and combined(proxies[1]))
    assert by_model(usage(proxies[0]))[("openai", "gpt-4o-mini")]["output_tokens"] == 12
    for p in proxies:
        assert_no_secret(p.log() + admin(p, "/metrics").text)


# -- RedisLedger against a real Redis ---------------------------------------------------------
@pytest_asyncio.fixture
async def client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    redis = Redis.from_url(redis_server.url)
    yield redis
    await redis.aclose()


NOW = 1773576000.0  # 2026-03-15T12:00:00Z
KEY = ("open|ai", "gpt%7C4o", "default", "a|b")  # separators in names must not forge fields


@pytest.mark.asyncio
async def test_flush_load_round_trip_and_a_retried_batch_counts_once(client: Redis) -> None:
    led = Ledger()
    led.persist = True
    store = RedisLedger(led, client)
    led.record(NOW, KEY, Usage(10, 5, cached_input=2), 0.25)
    led.record_cached(NOW, KEY, 0.125)  # a cache hit: saved_usd is a float field like cost_usd
    await store.flush()
    assert store.clean and led.pending == {}
    fields = await client.hgetall(PREFIX + "2026-03-15")
    assert fields[b"open%7Cai|gpt%257C4o|default|a%7Cb|requests"] == b"1"
    assert 400 * 86400 - 5 < await client.ttl(PREFIX + "2026-03-15") <= 400 * 86400

    # a batch whose reply was lost is sent again with the same id: applied once
    led.record(NOW, KEY, Usage(1, 1), 0.5)
    batch = led.take_pending()
    store._unsent = ("lost-reply", batch)  # noqa: SLF001 - as a timed-out flush leaves it
    await store.flush()
    store._unsent = ("lost-reply", batch)  # noqa: SLF001
    await store.flush()
    assert store.statistics()["duplicates"] == 1

    other = Ledger()  # another sidecar, and this one after a restart
    await RedisLedger(other, client).load_all(NOW)
    assert other.query("2026-03-15")[KEY] == [2, 11, 6, 2, 0, 0, 0, 0, 0.75, 1, 0.125]
    assert other.spend(NOW, "open|ai", "a|b") == (0.75, 0.75)


@pytest.mark.asyncio
async def test_a_failed_flush_keeps_the_batch(redis_server: RedisServer, client: Redis) -> None:
    led = Ledger()
    led.persist = True
    store = RedisLedger(led, client, timeout=0.2)
    led.record(NOW, KEY, Usage(10, 5), 0.25)
    redis_server.pause()
    try:
        with pytest.raises(Exception):  # noqa: B017 - a timeout or a connection error, by platform
            await store.flush()
        assert not store.clean and store.statistics()["flush_failures"] == 1
    finally:
        redis_server.resume()
    led.record(NOW, KEY, Usage(1, 1), 0.0)
    await store.flush()  # the old batch, then the new one
    assert store.clean and store.statistics()["flushes"] >= 2
    fields = await client.hgetall(PREFIX + "2026-03-15")
    # the timed-out call may still run once Redis resumes: its batch id makes the retry a no-op
    assert fields[b"open%7Cai|gpt%257C4o|default|a%7Cb|requests"] == b"2"


def test_the_addon_loads_by_name() -> None:
    """The addon loads by name, as ``--addon`` and the policy's ``addons`` do."""
    from addons import load_addons

    (addon,) = load_addons("addons.usage:UsageMeter")
    assert isinstance(addon, UsageMeter)
