"""The response cache and coalescing through a real sidekey process: the
official SDKs, curl and httpx against the fake provider over TLS (#12)."""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any

import anthropic
import httpx
import openai
import pytest
from redis.asyncio import Redis

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import (
    OPENAI_KEY,
    PLACEHOLDER,
    SECRET_ENV,
    assert_no_secret,
    curl,
    fake_provider,
    policy_for,
)
from tests.integration.polling import wait_for
from tests.integration.sidekey_process import SidekeyProcess
from tests.redis_server import RedisServer, redis_server_fixture  # noqa: F401 - the redis_server fixture

Start = Callable[..., SidekeyProcess]
CACHE = "{ttl: 5m, stale_if_error: 1h}"
MESSAGES: list[Any] = [{"role": "user", "content": "say hello to me"}]  # each SDK types them as its own TypedDicts


def cached_policy(fake: FakeProviderThread, cache: str = CACHE, extra: str = "") -> str:
    """openai and anthropic with a cache; 'other' the same upstream under a second key."""
    text = policy_for(fake, extra=extra + fake_provider(fake, "other", "other.test",
                      auth="{type: bearer, secret: env:OTHER_KEY}", cache=cache))  # fmt: skip
    text = text.replace(
        "    retry: {attempts: 1}  # failure", f"    cache: {cache}\n    retry: {{attempts: 1}}  # failure"
    )
    return text.replace(
        "    set_headers: {anthropic-version", f"    cache: {cache}\n    set_headers: {{anthropic-version"
    )


@pytest.fixture
def proxy(start_sidekey: Start, fake: FakeProviderThread, monkeypatch: pytest.MonkeyPatch) -> SidekeyProcess:
    started = start_sidekey(cached_policy(fake), env={**SECRET_ENV, "OTHER_KEY": "sk-other-REALKEY-77"})
    client_env(monkeypatch, started)
    return started


def client_env(monkeypatch: pytest.MonkeyPatch, proxy: SidekeyProcess) -> None:
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_path))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)


def upstream_calls(fake: FakeProviderThread, path: str = "/v1/chat/completions") -> int:
    return sum(1 for r in fake.received if r.path == path)


def chat_raw(client: openai.OpenAI, **extra: Any) -> Any:
    return client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MESSAGES, **extra)


def post(proxy: SidekeyProcess, body: str, *headers: str, host: str = "api.openai.com") -> tuple[dict[str, str], str]:
    args = ["-s", "-D", "-", "-H", "content-type: application/json"]
    for h in headers:
        args += ["-H", h]
    result = curl(proxy, *args, "-d", body, f"https://{host}/v1/chat/completions")
    head, _, text = result.stdout.partition("\n\n")  # text mode: CRLF read as LF
    assert head.startswith("HTTP/1.1 "), result.stdout + result.stderr
    fields = dict(line.split(": ", 1) for line in head.split("\n")[1:] if ": " in line)
    return {k.lower(): v for k, v in fields.items()}, text


def test_miss_then_hit_calls_the_upstream_once(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    client = openai.OpenAI(api_key=PLACEHOLDER)
    first = chat_raw(client)
    second = chat_raw(client)
    assert first.headers["x-sidekey-cache"] == "miss" and second.headers["x-sidekey-cache"] == "hit"
    assert int(second.headers["age"]) >= 0
    assert first.parse().model_dump() == second.parse().model_dump()  # the same answer, id included
    assert upstream_calls(fake) == 1
    other = chat_raw(client, temperature=0.3)  # a parameter that changes the answer
    tools = chat_raw(client, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert other.headers["x-sidekey-cache"] == "miss" and tools.headers["x-sidekey-cache"] == "miss"
    assert upstream_calls(fake) == 3


def test_reordered_json_keys_share_and_other_keys_never(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    a = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": 0})
    b = json.dumps({"temperature": 0, "messages": MESSAGES, "model": "gpt-4o-mini"}, indent=2)
    assert post(proxy, a)[0]["x-sidekey-cache"] == "miss"
    head, body = post(proxy, b)
    assert head["x-sidekey-cache"] == "hit" and json.loads(body)["object"] == "chat.completion"
    # The same request to a provider holding another API key: its own entry.
    assert post(proxy, a, host="other.test")[0]["x-sidekey-cache"] == "miss"
    assert post(proxy, a, host="other.test")[0]["x-sidekey-cache"] == "hit"
    assert upstream_calls(fake) == 2
    assert set(fake.headers_seen("authorization")) == {"Bearer sk-other-REALKEY-77", f"Bearer {OPENAI_KEY}"}


def test_caller_directives_are_honoured_and_never_forwarded(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    assert post(proxy, body, "x-sidekey-cache: no-store")[0]["x-sidekey-cache"] == "bypass"
    assert post(proxy, body)[0]["x-sidekey-cache"] == "miss"  # no-store wrote nothing
    assert post(proxy, body, "cache-control: no-cache")[0]["x-sidekey-cache"] == "bypass"  # revalidate
    assert post(proxy, body, "x-sidekey-cache-ttl: 60")[0]["x-sidekey-cache"] == "hit"
    assert upstream_calls(fake) == 3
    for request in fake.received:
        names = {k.lower() for k, _ in request.headers}
        assert not names & {"x-sidekey-cache", "x-sidekey-cache-ttl", "cache-control"}


@pytest.mark.parametrize("sdk", ["openai", "anthropic"])
def test_a_streamed_hit_is_the_streamed_miss(proxy: SidekeyProcess, fake: FakeProviderThread, sdk: str) -> None:
    def run() -> tuple[Any, list[Any]]:
        if sdk == "openai":
            client = openai.OpenAI(api_key=PLACEHOLDER)
            with client.chat.completions.stream(
                model="gpt-4o-mini", messages=MESSAGES, stream_options={"include_usage": True}
            ) as stream:
                events = [e.model_dump() for e in stream]
                return stream.get_final_completion().model_dump(), events
        aclient = anthropic.Anthropic(api_key=PLACEHOLDER)
        with aclient.messages.stream(model="claude-sonnet-4-5", max_tokens=64, messages=MESSAGES) as astream:
            events = [e.model_dump() for e in astream]
            return astream.get_final_message().model_dump(), events

    miss, miss_events = run()
    hit, hit_events = run()
    assert hit == miss and hit_events == miss_events and len(miss_events) > 2
    assert "usage" in json.dumps(miss)
    path = "/v1/chat/completions" if sdk == "openai" else "/v1/messages"
    assert upstream_calls(fake, path) == 1


def test_a_cut_stream_is_never_stored(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True})
    post(proxy, body, "x-fake-cut-after: 2")
    head, text = post(proxy, body)
    assert head["x-sidekey-cache"] == "miss" and "[DONE]" in text
    assert post(proxy, body)[0]["x-sidekey-cache"] == "hit"
    assert upstream_calls(fake) == 2


async def _concurrent(proxy: SidekeyProcess, body: dict[str, Any], n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(proxy.ca_path)), timeout=60,
                                 limits=httpx.Limits(max_connections=n)) as client:  # fmt: skip
        calls = [client.post("https://api.openai.com/v1/chat/completions", json=body) for _ in range(n)]
        return await asyncio.gather(*calls)


@pytest.mark.parametrize("stream", [False, True])
def test_fifty_identical_requests_reach_the_upstream_once(proxy: SidekeyProcess, fake: FakeProviderThread,
                                                          stream: bool) -> None:  # fmt: skip
    fake.hold_requests()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream}

    async def run() -> list[httpx.Response]:
        task = asyncio.create_task(_concurrent(proxy, body, 50))
        deadline = time.monotonic() + 60
        while upstream_calls(fake) < 1 and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another thread
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # the others arrive meanwhile; any that do not are hits later
        fake.release_requests()
        return await task

    responses = asyncio.run(run())
    assert upstream_calls(fake) == 1
    results = [r.headers["x-sidekey-cache"] for r in responses]
    assert results.count("miss") == 1 and set(results) <= {"miss", "coalesced", "hit"}
    assert results.count("coalesced") >= 1
    texts = {r.text for r in responses}
    assert len(texts) == 1 and all(r.status_code == 200 for r in responses)
    if stream:
        assert next(iter(texts)).rstrip().endswith("data: [DONE]")


def test_stale_is_served_only_when_the_upstream_fails(start_sidekey: Start, fake: FakeProviderThread,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    proxy = start_sidekey(cached_policy(fake, "{ttl: 1, stale_if_error: 1h}"), env={**SECRET_ENV, "OTHER_KEY": "k"})
    body = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    first = post(proxy, body)
    fake.call(lambda p: setattr(p, "down", True))
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # hits until the entry is no longer fresh (ttl 1 s)
        head, text = post(proxy, body)
        if head["x-sidekey-cache"] != "hit":
            break
    assert head["x-sidekey-cache"] == "stale" and json.loads(text)["object"] == "chat.completion"
    fake.call(lambda p: setattr(p, "down", False))
    assert post(proxy, body)[0]["x-sidekey-cache"] in ("miss", "hit")
    assert first[0]["x-sidekey-cache"] == "miss"
    assert_no_secret(proxy.log())


def admin(proxy: SidekeyProcess, method: str, path: str) -> httpx.Response:
    return httpx.request(method, proxy.admin_url + path, timeout=30, trust_env=False)


def test_stats_metrics_and_delete(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    chat = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    for _ in range(3):
        post(proxy, chat)
    stats = admin(proxy, "GET", "/cache/stats").json()["providers"]["openai"]
    assert (stats["miss"], stats["hit"], stats["entries"], stats["hit_ratio"]) == (1, 2, 1, 0.6667)
    assert 0 < stats["bytes"] <= stats["max_bytes"]
    metrics = admin(proxy, "GET", "/metrics").text
    assert 'sidekey_cache_requests_total{provider="openai",result="hit"} 2.0' in metrics
    assert 'sidekey_cache_entries{provider="openai"} 1.0' in metrics
    assert admin(proxy, "DELETE", "/cache?provider=openai&pattern=/v1/embeddings").json() == {"deleted": 0}
    assert admin(proxy, "DELETE", "/cache?provider=openai&pattern=/v1/chat/*").json() == {"deleted": 1}
    assert admin(proxy, "DELETE", "/cache?provider=nope").status_code == 404
    assert admin(proxy, "DELETE", "/cache?pattern=sk-x").status_code == 400
    assert post(proxy, chat)[0]["x-sidekey-cache"] == "miss"
    assert upstream_calls(fake) == 2

    def results() -> list[str]:  # the access line is written just after the answer: polled
        return [line.split("cache=")[1].split()[0] for line in proxy.log().splitlines() if "cache=" in line]

    assert wait_for(lambda: len(results()) >= 4), results()
    assert results()[-4:] == ["miss", "hit", "hit", "miss"]


def test_a_hit_takes_nothing_from_the_limits(start_sidekey: Start, fake: FakeProviderThread) -> None:
    policy = cached_policy(fake).replace(
        "  openai:\n", "  openai:\n    limits: {requests_per_minute: 100, tokens_per_minute: 1000000}\n", 1
    )
    proxy = start_sidekey(policy, env={**SECRET_ENV, "OTHER_KEY": "k"})
    a = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    b = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES, "temperature": 1})
    first, _ = post(proxy, a)
    assert first["x-sidekey-cache"] == "miss" and first["x-ratelimit-remaining-requests-minute"] == "99"
    for _ in range(3):
        hit, _ = post(proxy, a)
        assert hit["x-sidekey-cache"] == "hit"
        assert not any(name.startswith("x-ratelimit-") for name in hit)  # a hit reports no quota
    second, _ = post(proxy, b)
    assert second["x-sidekey-cache"] == "miss" and second["x-ratelimit-remaining-requests-minute"] == "98"
    # b is the size of a: if the three hits had taken tokens, more than two a's would be gone.
    used_by_a = 1000000 - int(first["x-ratelimit-remaining-tokens-minute"])
    assert int(second["x-ratelimit-remaining-tokens-minute"]) >= 1000000 - 2 * used_by_a


def test_usage_counts_answers_from_the_cache_as_cached_with_the_cost_saved(proxy: SidekeyProcess,
                                                                         fake: FakeProviderThread) -> None:  # fmt: skip
    chat = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    assert [post(proxy, chat)[0]["x-sidekey-cache"] for _ in range(3)] == ["miss", "hit", "hit"]
    rows = admin(proxy, "GET", "/usage?provider=openai").json()["by"]
    upstream = next(r for r in rows if r["upstream"] == "default")
    cached = next(r for r in rows if r["upstream"] == "cache")
    assert (upstream["requests"], upstream["cached"]) == (1, 0) and upstream["cost_usd"] > 0
    assert (cached["requests"], cached["cached"], cached["model"]) == (0, 2, "gpt-4o-mini")
    assert cached["cost_usd"] == 0 and cached["input_tokens"] == 0  # nothing spent: budgets never see it
    assert cached["saved_usd"] == pytest.approx(2 * upstream["cost_usd"])
    assert admin_stats(proxy)["providers"]["openai"]["saved_usd"] == pytest.approx(2 * upstream["cost_usd"], abs=1e-6)
    metrics = admin(proxy, "GET", "/metrics").text
    line = next(x for x in metrics.splitlines() if x.startswith('sidekey_cache_saved_usd_total{provider="openai"}'))
    assert float(line.split()[-1]) == pytest.approx(2 * upstream["cost_usd"])


def test_hits_count_in_caller_request_limits_only_when_asked(start_sidekey: Start, fake: FakeProviderThread) -> None:
    """openai: ``count_hits: caller``, so its caller's 3 requests a minute are 1 miss and 2 hits,
    and the next hit is refused; 'other' (the default) answers hits past its caller limit."""
    policy = cached_policy(fake, "{ttl: 5m}").replace("cache: {ttl: 5m}", "cache: {ttl: 5m, count_hits: caller}", 1)
    policy = policy.replace("  openai:\n", "  openai:\n    caller_limits: {requests_per_minute: 3}\n", 1)
    policy = policy.replace("  other:\n", "  other:\n    caller_limits: {requests_per_minute: 1}\n", 1)
    proxy = start_sidekey(policy, env={**SECRET_ENV, "OTHER_KEY": "k"})
    chat = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    heads = [post(proxy, chat)[0] for _ in range(3)]
    assert [h["x-sidekey-cache"] for h in heads] == ["miss", "hit", "hit"]
    refused, text = post(proxy, chat)
    assert json.loads(text)["error"]["code"] == "rate_limited" and "x-sidekey-cache" not in refused
    other = [post(proxy, chat, host="other.test")[0]["x-sidekey-cache"] for _ in range(4)]
    assert other == ["miss", "hit", "hit", "hit"]  # its caller limit of 1 is not spent by hits
    assert upstream_calls(fake) == 2


def test_a_failed_leader_does_not_fail_its_followers(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    """The first request's answer is a 503 (not stored): one follower leads
    again, the others follow it; every follower gets the 200."""
    fake.hold_requests()
    url = "https://api.openai.com/flaky/leader/1"

    async def run() -> list[httpx.Response]:
        async with httpx.AsyncClient(proxy=proxy.url, timeout=60,
                                     verify=ssl.create_default_context(cafile=str(proxy.ca_path))) as client:  # fmt: skip
            first = asyncio.create_task(client.get(url))
            deadline = time.monotonic() + 60
            while not fake.received and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another thread
                await asyncio.sleep(0.05)
            followers = [asyncio.create_task(client.get(url)) for _ in range(9)]
            while admin_stats(proxy)["in_flight"] < 1 and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # the followers reach the flight meanwhile; any later one is a hit
            fake.release_requests()
            return [await first, *(await asyncio.gather(*followers))]

    leader, *followers = asyncio.run(run())
    assert leader.status_code == 503 and leader.headers["x-sidekey-cache"] == "miss"
    assert all(r.status_code == 200 for r in followers), [r.status_code for r in followers]
    assert len({r.text for r in followers}) == 1
    results = sorted(r.headers["x-sidekey-cache"] for r in followers)
    assert results.count("miss") == 1 and results.count("coalesced") >= 1, results
    assert sum(1 for r in fake.received if r.path == "/flaky/leader/1") == 2


def admin_stats(proxy: SidekeyProcess) -> dict[str, Any]:
    stats: dict[str, Any] = admin(proxy, "GET", "/cache/stats").json()
    return stats


def test_two_sidecars_share_entries_through_redis(start_sidekey: Start, fake: FakeProviderThread,
                                                   redis_server: RedisServer) -> None:  # fmt: skip
    policy = cached_policy(fake, "{ttl: 5m, backend: redis}").replace(
        "unmatched: tunnel\n", f"unmatched: tunnel\nredis: {{url: '{redis_server.url}'}}\n", 1
    )
    env = {**SECRET_ENV, "OTHER_KEY": "sk-other-REALKEY-77"}
    first, second = start_sidekey(policy, env=env), start_sidekey(policy, env=env)
    chat = json.dumps({"model": "gpt-4o-mini", "messages": MESSAGES})
    head, body = post(first, chat)
    assert head["x-sidekey-cache"] == "miss"
    assert wait_for(lambda: admin_stats(second)["providers"]["openai"]["entries"] == 1)  # written in the background
    head2, body2 = post(second, chat)
    assert head2["x-sidekey-cache"] == "hit" and body2 == body
    assert post(second, chat, host="other.test")[0]["x-sidekey-cache"] == "miss"  # another key: its own entry
    assert upstream_calls(fake) == 2
    keys = asyncio.run(_redis_keys(redis_server.url))
    assert keys and all(k.startswith("sidekey:cache:") for k in keys)
    assert all("{sidekey-cache:" in k for k in keys if k != "sidekey:cache:identity-key")  # one slot per provider
    assert not any(s in k for k in keys for s in SECRET_ENV.values())
    deleted = admin(first, "DELETE", "/cache?provider=openai&pattern=/v1/chat/*").json()
    assert deleted == {"deleted": 1}
    assert post(second, chat)[0]["x-sidekey-cache"] == "miss"
    for proxy in (first, second):
        assert_no_secret(proxy.log())


async def _redis_keys(url: str) -> list[str]:
    client = Redis.from_url(url)
    try:
        return [k.decode() async for k in client.scan_iter(match="sidekey:cache:*")]
    finally:
        await client.aclose()


def _cluster_pair(start_sidekey: Start, fake: FakeProviderThread, redis_server: RedisServer) -> list[SidekeyProcess]:
    policy = cached_policy(fake, "{ttl: 5m, backend: redis, coalesce: cluster}").replace(
        "unmatched: tunnel\n", f"unmatched: tunnel\nredis: {{url: '{redis_server.url}'}}\n", 1
    )
    env = {**SECRET_ENV, "OTHER_KEY": "sk-other-REALKEY-77"}
    return [start_sidekey(policy, env=env), start_sidekey(policy, env=env)]


async def _get_many(proxy: SidekeyProcess, url: str, n: int) -> list[httpx.Response]:
    async with httpx.AsyncClient(proxy=proxy.url, verify=ssl.create_default_context(cafile=str(proxy.ca_path)),
                                 timeout=60, limits=httpx.Limits(max_connections=n)) as client:  # fmt: skip
        return list(await asyncio.gather(*(client.get(url) for _ in range(n))))


async def _until(check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + 60
    while not check() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls another thread or process
        await asyncio.sleep(0.05)
    assert check()


@pytest.mark.parametrize("stream", [False, True])
def test_cluster_coalescing_reaches_the_upstream_once_across_two_sidecars(
    start_sidekey: Start, fake: FakeProviderThread, redis_server: RedisServer, stream: bool
) -> None:
    """N identical requests to each of two sidecars sharing a Redis while the first is
    held upstream: one upstream call; the other sidecar's requests wait on the Redis lock
    (one of them polls, the rest follow it locally) and are answered from the entry."""
    first, second = _cluster_pair(start_sidekey, fake, redis_server)
    fake.hold_requests()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": stream}

    async def run() -> tuple[list[httpx.Response], list[httpx.Response]]:
        here = asyncio.create_task(_concurrent(first, body, 8))
        await _until(lambda: upstream_calls(fake) >= 1)
        there = asyncio.create_task(_concurrent(second, body, 8))
        await _until(lambda: admin_stats(second)["in_flight"] >= 1)  # waiting on the other sidecar's lock
        await asyncio.sleep(0.5)  # the others arrive meanwhile; any that do not are hits later
        fake.release_requests()
        return await here, await there

    here, there = asyncio.run(run())
    assert upstream_calls(fake) == 1
    assert [r.status_code for r in here + there] == [200] * 16
    assert len({r.text for r in here + there}) == 1
    results = [r.headers["x-sidekey-cache"] for r in here + there]
    assert results.count("miss") == 1 and "miss" in results[:8], results  # the first sidecar led
    assert set(results[8:]) <= {"coalesced", "hit"} and "coalesced" in results[8:], results
    if stream:
        assert here[0].text.rstrip().endswith("data: [DONE]")
    keys = asyncio.run(_redis_keys(redis_server.url))
    assert not any(":l:" in k for k in keys)  # the lock was released after the entry was written
    assert all("{sidekey-cache:openai}" in k for k in keys if k != "sidekey:cache:identity-key")


def test_cluster_waiters_take_over_when_the_leading_sidecar_fails(
    start_sidekey: Start, fake: FakeProviderThread, redis_server: RedisServer
) -> None:
    """The first sidecar's leader gets a 503 (not stored) and releases the lock: one
    request of the second sidecar takes it and leads; every one of them gets the 200."""
    first, second = _cluster_pair(start_sidekey, fake, redis_server)
    fake.hold_requests()
    url = "https://api.openai.com/flaky/cluster/1"

    async def run() -> tuple[httpx.Response, list[httpx.Response]]:
        leader = asyncio.create_task(_get_many(first, url, 1))
        await _until(lambda: len(fake.received) >= 1)
        waiters = asyncio.create_task(_get_many(second, url, 6))
        await _until(lambda: admin_stats(second)["in_flight"] >= 1)
        await asyncio.sleep(0.5)
        fake.release_requests()
        return (await leader)[0], await waiters

    leader, waiters = asyncio.run(run())
    assert leader.status_code == 503 and leader.headers["x-sidekey-cache"] == "miss"
    assert [r.status_code for r in waiters] == [200] * 6
    assert len({r.text for r in waiters}) == 1
    results = [r.headers["x-sidekey-cache"] for r in waiters]
    assert results.count("miss") == 1 and set(results) <= {"miss", "coalesced", "hit"}, results
    assert sum(1 for r in fake.received if r.path == "/flaky/cluster/1") == 2


def _slow_client(proxy: SidekeyProcess, body: bytes) -> ssl.SSLSocket:
    """A client through the proxy that sends its request and then reads nothing:
    a tiny receive buffer, so the proxy's writes to it soon stop."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(60)
    raw.connect(("127.0.0.1", proxy.port))
    raw.sendall(b"CONNECT api.openai.com:443 HTTP/1.1\r\nHost: api.openai.com:443\r\n\r\n")
    head = b""
    while b"\r\n\r\n" not in head:
        head += raw.recv(1)
    assert head.startswith(b"HTTP/1.1 200"), head
    tls = ssl.create_default_context(cafile=str(proxy.ca_path)).wrap_socket(raw, server_hostname="api.openai.com")
    tls.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\ncontent-type: application/json\r\n"
                b"accept: */*\r\naccept-encoding: identity\r\n"  # as the httpx clients here: one key
                b"content-length: %d\r\n\r\n%s" % (len(body), body))  # fmt: skip
    return tls


def _read_all(sock: ssl.SSLSocket) -> bytes:
    got = b""
    try:
        while piece := sock.recv(65536):
            got += piece
    except (ConnectionError, ssl.SSLError):
        pass  # the cut: aborted, no close_notify
    sock.close()
    return got


async def _stream_text(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    async with client.stream("POST", "https://api.openai.com/v1/chat/completions", json=body) as resp:
        assert resp.headers["x-sidekey-cache"] in ("miss", "coalesced")
        return "".join([part async for part in resp.aiter_text()])


def test_a_slow_stream_follower_is_cut_with_an_error_event_while_the_others_finish(
    start_sidekey: Start, fake: FakeProviderThread
) -> None:
    """An 8 MB stream (2,000 events, 2 ms apart) shared by a leader, two followers
    that read as it comes and one that reads nothing: the two get all of it, complete,
    while the slow one has not read a byte; the slow one then finds an `event: error`
    (cache_follower_too_slow) after what was still buffered for it, and a cut, never a
    clean end. The window (max_entry_bytes) is 1 MiB: half a second of the stream."""
    proxy = start_sidekey(cached_policy(fake, "{ttl: 5m, max_entry_bytes: 1MiB}"),
                          env={**SECRET_ENV, "OTHER_KEY": "k"})  # fmt: skip
    fake.call(lambda p: setattr(p, "openai_reply", " ".join(["x" * 4096] * 2000)))
    fake.stream_delay = 0.002
    fake.hold_requests()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}

    async def run() -> tuple[list[str], ssl.SSLSocket]:
        async with httpx.AsyncClient(proxy=proxy.url, timeout=120, headers={"accept-encoding": "identity"},
                                     verify=ssl.create_default_context(cafile=str(proxy.ca_path))) as client:  # fmt: skip
            leader = asyncio.create_task(_stream_text(client, body))
            await _until(lambda: upstream_calls(fake) >= 1)
            fast = [asyncio.create_task(_stream_text(client, body)) for _ in range(2)]
            slow = await asyncio.to_thread(_slow_client, proxy, json.dumps(body).encode())
            await _until(lambda: admin_stats(proxy)["following"] >= 3)
            fake.release_requests()
            return await asyncio.gather(leader, *fast), slow

    texts, slow = asyncio.run(run())
    assert len(set(texts)) == 1 and texts[0].rstrip().endswith("data: [DONE]") and len(texts[0]) > 8_000_000
    got = _read_all(slow)
    assert got.startswith(b"HTTP/1.1 200") and b"x-sidekey-cache: coalesced" in got
    assert b"event: error" in got and b"cache_follower_too_slow" in got
    assert not got.endswith(b"0\r\n\r\n") and b"[DONE]" not in got  # cut: no clean end
    assert len(got) < len(texts[0])
    assert upstream_calls(fake) == 1


def test_the_leaders_client_leaving_does_not_cut_its_followers(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    """The leader's client reads the first event and hangs up; the upstream answer is
    still read to its end for the followers, who get all of it, and it is stored."""
    fake.call(lambda p: setattr(p, "openai_reply", " ".join(f"w{i}" for i in range(40))))
    fake.stream_delay = 0.05  # the stream outlasts the leader's client by many writes
    fake.hold_requests()
    body = {"model": "gpt-4o-mini", "messages": MESSAGES, "stream": True}

    async def leave_early(client: httpx.AsyncClient) -> str:
        async with client.stream("POST", "https://api.openai.com/v1/chat/completions", json=body) as resp:
            assert resp.headers["x-sidekey-cache"] == "miss"
            async for part in resp.aiter_text():
                return part  # and hang up (the context closes the connection mid-body)
        return ""

    async def run() -> list[str]:
        verify = ssl.create_default_context(cafile=str(proxy.ca_path))
        async with httpx.AsyncClient(proxy=proxy.url, timeout=60, verify=verify) as first, \
                httpx.AsyncClient(proxy=proxy.url, timeout=60, verify=verify) as others:  # fmt: skip
            leader = asyncio.create_task(leave_early(first))
            await _until(lambda: upstream_calls(fake) >= 1)
            followers = [asyncio.create_task(_stream_text(others, body)) for _ in range(3)]
            await _until(lambda: admin_stats(proxy)["following"] >= 3)
            fake.release_requests()
            assert (await leader).startswith("data: ")
            texts = list(await asyncio.gather(*followers))
            again = await others.post("https://api.openai.com/v1/chat/completions", json=body)
            assert (
                again.headers["x-sidekey-cache"] == "hit" and again.text == texts[0]
            )  # stored, though its client left
            return texts

    texts = asyncio.run(run())
    assert len(set(texts)) == 1 and texts[0].rstrip().endswith("data: [DONE]") and "w39" in texts[0]
    assert upstream_calls(fake) == 1
