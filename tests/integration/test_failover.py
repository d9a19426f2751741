"""Upstream groups (key pools) and cross-provider failover through a real
sidekey, with real clients, against fakes that fail on command."""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import DOWN, OPENAI_KEY, PLACEHOLDER, SECRET_ENV, curl, policy_for

KEY_A, KEY_B = "sk-pool-KEYA-1111", "sk-pool-KEYB-2222"
GROQ_KEY = "gsk_REALGROQ-3333"
ENV = {**SECRET_ENV, "POOL_KEY_A": KEY_A, "POOL_KEY_B": KEY_B, "GROQ_API_KEY": GROQ_KEY}


@pytest.fixture
def groq() -> Iterator[FakeProviderThread]:
    with FakeProviderThread() as provider:
        yield provider


def groq_provider(groq: FakeProviderThread) -> str:
    return f"""\
  groq:
    hosts: [api.groq.test]
    upstream: https://localhost:{groq.port}
    auth: {{type: bearer, secret: env:GROQ_API_KEY}}
    tls: {{ca_bundle: {groq.ca_pem_path}}}
    retry: {{attempts: 1}}
"""


def pooled(fake: FakeProviderThread, primary_url: str | None = None, fallbacks: str = "") -> str:
    """A provider with two keys (key-a preferred), optionally falling back to groq."""
    url = primary_url or f"https://localhost:{fake.port}"
    return f"""\
  pooled:
    hosts: [pool.test]
    upstream: {url}
    auth: {{type: bearer, secret: env:OPENAI_API_KEY}}
    tls: {{ca_bundle: {fake.ca_pem_path}}}
    timeouts: {{connect: 2, read: 5}}
    upstreams:
      - {{name: key-a, secret: env:POOL_KEY_A, priority: 0}}
      - {{name: key-b, secret: env:POOL_KEY_B, priority: 1}}
    retry: {{attempts: 3, backoff_base: 10ms, backoff_cap: 50ms, deadline: 10s}}
{fallbacks}"""


TO_GROQ = """\
    fallbacks:
      - provider: groq
        paths: [/v1/chat/completions]
        rewrite_path: {from: /v1/, to: /openai/v1/}
        models: {gpt-4o-mini: llama-3.1-8b-instant}
"""


def chat(proxy: object, model: str = "gpt-4o-mini", *, stream: bool = False) -> tuple[dict[str, str], str]:
    """A chat completion through sidekey with the openai SDK; (headers, text)."""
    import httpx
    import openai

    trust = ssl.create_default_context(cafile=str(proxy.ca_path))  # type: ignore[attr-defined]
    http = httpx.Client(proxy=proxy.url, verify=trust, trust_env=False)  # type: ignore[attr-defined]
    client = openai.OpenAI(api_key=PLACEHOLDER, base_url="https://pool.test/v1", max_retries=0, http_client=http)  # type: ignore[arg-type]  # the openai SDK annotates httpx2.Client; an httpx.Client serves
    messages: list[Any] = [{"role": "user", "content": "hi"}]  # the SDK types them as TypedDicts
    with http:
        if stream:
            with client.chat.completions.with_streaming_response.create(
                model=model, messages=messages, stream=True
            ) as resp:
                text = "".join(c.choices[0].delta.content or "" for c in resp.parse() if c.choices)
                return dict(resp.headers), text
        raw = client.chat.completions.with_raw_response.create(model=model, messages=messages)
        return dict(raw.headers), raw.parse().choices[0].message.content or ""


def keys_seen(fake: FakeProviderThread) -> list[str]:
    return [h.removeprefix("Bearer ") for h in fake.headers_seen("authorization")]


def test_key_pool_rotates_when_one_key_is_throttled(start_sidekey: object, fake: FakeProviderThread) -> None:
    fake.provider.throttled_keys.add(KEY_A)
    proxy = start_sidekey(policy_for(fake, extra=pooled(fake)), env=ENV)  # type: ignore[operator]
    headers, text = chat(proxy)
    assert text
    assert (headers["x-sidekey-provider"], headers["x-sidekey-upstream"]) == ("pooled", "key-b")
    assert headers["x-sidekey-attempts"] == "2"
    # The 429 said "reset in 20s": key-a rests, so the next request goes straight to key-b.
    headers, _ = chat(proxy)
    assert headers["x-sidekey-upstream"] == "key-b" and "x-sidekey-attempts" not in headers
    assert keys_seen(fake) == [KEY_A, KEY_B, KEY_B]


def test_every_key_throttled_answers_429_at_once(start_sidekey: object, fake: FakeProviderThread) -> None:
    fake.provider.throttled_keys.update({KEY_A, KEY_B})
    proxy = start_sidekey(policy_for(fake, extra=pooled(fake)), env=ENV)  # type: ignore[operator]
    first = curl(proxy, "-i", "https://pool.test/v1/models")  # both keys tried, both 429
    assert first.stdout.startswith("HTTP/1.1 429") and "x-sidekey-attempts: 2" in first.stdout.lower()
    second = curl(proxy, "-i", "https://pool.test/v1/models")  # known throttled: not sent at all
    assert second.stdout.startswith("HTTP/1.1 429")
    assert '"upstream_rate_limited"' in second.stdout and "retry-after: 2" in second.stdout.lower()
    assert len(fake.received) == 2


def test_failover_rewrites_path_model_and_credential(
    start_sidekey: object, fake: FakeProviderThread, groq: FakeProviderThread
) -> None:
    extra = pooled(fake, primary_url=DOWN, fallbacks=TO_GROQ) + groq_provider(groq)
    proxy = start_sidekey(policy_for(fake, extra=extra), env=ENV)  # type: ignore[operator]
    headers, text = chat(proxy)
    assert text
    assert (headers["x-sidekey-provider"], headers["x-sidekey-upstream"]) == ("groq", "default")
    [request] = groq.received
    assert request.path == "/openai/v1/chat/completions"
    assert request.body_json is not None and request.body_json["model"] == "llama-3.1-8b-instant"
    assert request.body_json["messages"] == [{"role": "user", "content": "hi"}]
    assert keys_seen(groq) == [GROQ_KEY]  # its own key only: never the pool's or the caller's
    # Streaming goes over too, and the stream arrives whole.
    headers, text = chat(proxy, stream=True)
    assert headers["x-sidekey-provider"] == "groq" and text
    assert keys_seen(groq) == [GROQ_KEY, GROQ_KEY]
    assert not fake.received  # the primary is down: nothing reached it


def test_failover_after_the_pool_is_throttled_then_skips_the_primary(
    start_sidekey: object, fake: FakeProviderThread, groq: FakeProviderThread
) -> None:
    fake.provider.throttled_keys.update({KEY_A, KEY_B})
    extra = pooled(fake, fallbacks=TO_GROQ) + groq_provider(groq)
    proxy = start_sidekey(policy_for(fake, extra=extra), env=ENV)  # type: ignore[operator]
    headers, _ = chat(proxy)
    assert (headers["x-sidekey-provider"], headers["x-sidekey-attempts"]) == ("groq", "3")
    headers, _ = chat(proxy)  # both keys rest: straight to the fallback, no wasted attempt
    assert headers["x-sidekey-provider"] == "groq" and "x-sidekey-attempts" not in headers
    assert keys_seen(fake) == [KEY_A, KEY_B]
    assert keys_seen(groq) == [GROQ_KEY, GROQ_KEY]
    assert OPENAI_KEY not in fake.headers_seen("authorization")


def test_model_without_a_mapping_does_not_fail_over(
    start_sidekey: object, fake: FakeProviderThread, groq: FakeProviderThread
) -> None:
    extra = pooled(fake, primary_url=DOWN, fallbacks=TO_GROQ) + groq_provider(groq)
    proxy = start_sidekey(policy_for(fake, extra=extra), env=ENV)  # type: ignore[operator]
    body = json.dumps({"model": "gpt-4.1", "messages": []})
    result = curl(
        proxy, "-i", "-H", "content-type: application/json", "-d", body, "https://pool.test/v1/chat/completions"
    )
    assert result.stdout.startswith("HTTP/1.1 502") and '"upstream_connect_error"' in result.stdout
    assert not groq.received


def test_members_with_own_keys_need_no_provider_secret(start_sidekey: object, fake: FakeProviderThread) -> None:
    """auth.secret left out: each member injects its own key for traffic, for
    a retry on the next key and for active health checks."""
    import httpx

    own_keys = f"""\
  pooled:
    hosts: [pool.test]
    upstream: https://localhost:{fake.port}
    auth: {{type: bearer}}
    tls: {{ca_bundle: {fake.ca_pem_path}}}
    upstreams:
      - {{name: key-a, secret: env:POOL_KEY_A, priority: 0}}
      - {{name: key-b, secret: env:POOL_KEY_B, priority: 1}}
    health_check: {{path: /v1/models, interval: 200ms, timeout: 2s}}
    retry: {{attempts: 2, backoff_base: 10ms, backoff_cap: 50ms, deadline: 10s}}
"""
    proxy = start_sidekey(policy_for(fake, extra=own_keys), env=ENV)  # type: ignore[operator]
    headers, text = chat(proxy)
    assert text and headers["x-sidekey-upstream"] == "key-a"
    fake.provider.throttled_keys.add(KEY_A)
    headers, text = chat(proxy)
    assert text and (headers["x-sidekey-upstream"], headers["x-sidekey-attempts"]) == ("key-b", "2")
    chats = [r.header("authorization") for r in fake.received if r.path == "/v1/chat/completions"]
    assert chats == [f"Bearer {KEY_A}", f"Bearer {KEY_A}", f"Bearer {KEY_B}"]
    deadline = time.monotonic() + 20
    while {f"Bearer {KEY_A}", f"Bearer {KEY_B}"} - {
        r.header("authorization") for r in fake.received if r.path == "/v1/models"
    }:
        assert time.monotonic() < deadline, "each member is health-checked with its own key"
        time.sleep(0.05)
    view = httpx.get(proxy.admin_url + "/providers", trust_env=False).json()
    pooled = next(p for p in view["providers"] if p["name"] == "pooled")
    assert pooled["auth"]["secret"] is None and pooled["secret_available"] is True
    assert [u["secret"] for u in pooled["upstreams"]] == ["env:POOL_KEY_A", "env:POOL_KEY_B"]
    assert OPENAI_KEY not in fake.headers_seen("authorization")
