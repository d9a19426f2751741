"""Retries through a real sidekey against a fake that fails on command.
The `retrying` provider (retry.test) retries 3 times with 10-50 ms backoff."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import DOWN, OPENAI_KEY, curl, extra_provider, fake_provider, policy_for
from tests.integration.polling import first_after_the_cooldown
from tests.integration.sidekey_process import SidekeyProcess


def paths(fake: FakeProviderThread, prefix: str) -> list[str]:
    return [r.method for r in fake.received if r.path.startswith(prefix)]


def test_get_retried_after_503_then_answered(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    result = curl(sidekey, "-i", "https://retry.test/flaky/a/2")
    assert " 200 " in result.stdout.splitlines()[0]
    assert "x-sidekey-attempts: 3" in result.stdout.lower()
    assert json.loads(result.stdout.split("\n\n", 1)[1]) == {"attempt": 3}
    assert paths(fake, "/flaky/a") == ["GET"] * 3
    assert fake.headers_seen("authorization") == [f"Bearer {OPENAI_KEY}"] * 3  # the key on every attempt


def test_post_retried_after_429_with_its_body(
    sidekey: SidekeyProcess, fake: FakeProviderThread, tmp_path: Path
) -> None:
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "x" * 200_000}]})
    path = tmp_path / "body.json"
    path.write_text(body)
    result = curl(
        sidekey,
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        f"@{path}",
        "https://retry.test/flaky/b/1?status=429&retry_after_ms=20",
    )
    assert json.loads(result.stdout) == {"attempt": 2}
    sent = [r for r in fake.received if r.path.startswith("/flaky/b")]
    assert [r.body_size for r in sent] == [len(body)] * 2
    assert sent[0].body_sha256 == sent[1].body_sha256


def test_post_not_retried_after_500(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    """A 500 after the request went out may mean the completion was billed."""
    result = curl(
        sidekey, "-s", "-o", "/dev/null", "-w", "%{http_code}", "-d", "{}", "https://retry.test/flaky/c/5?status=500"
    )
    assert result.stdout == "500"
    assert paths(fake, "/flaky/c") == ["POST"]


def test_retry_after_longer_than_the_deadline_is_not_slept(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    started = time.monotonic()
    result = curl(
        sidekey,
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "https://retry.test/flaky/d/5?status=429&retry_after=120",
    )
    assert result.stdout == "429"  # the upstream's answer, at once
    # Not slept: sleeping would run into the retry deadline (10 s, conftest's retry.test policy) or
    # the 120 s asked; an answer at once takes well under that even on a loaded machine.
    assert time.monotonic() - started < 10
    assert paths(fake, "/flaky/d") == ["GET"]


def test_attempts_are_bounded_and_overridable(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    curl(sidekey, "-s", "-o", "/dev/null", "https://retry.test/flaky/e/9")
    assert len(paths(fake, "/flaky/e")) == 3
    curl(sidekey, "-s", "-o", "/dev/null", "-H", "x-sidekey-retries: 0", "https://retry.test/flaky/f/9")
    assert len(paths(fake, "/flaky/f")) == 1
    assert fake.headers_seen("x-sidekey-retries") == []  # control headers never go upstream


def test_connect_errors_retried_even_for_post(start_sidekey: object, fake: FakeProviderThread) -> None:
    extra = extra_provider("down", "down.test", DOWN, retry="{attempts: 3, backoff_base: 10ms, backoff_cap: 20ms}")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    result = curl(proxy, "-i", "-d", "{}", "https://down.test/v1/chat/completions")
    assert " 502 " in result.stdout.splitlines()[0]
    assert "x-sidekey-attempts: 3" in result.stdout.lower()
    assert '"upstream_connect_error"' in result.stdout


def test_circuit_opens_fails_fast_half_opens_and_closes(start_sidekey: object, fake: FakeProviderThread) -> None:
    cooldown = 5  # s; outlasts the one curl run between the opening failure and the refusal, loaded or not
    circuit = f"{{failures: 2, cooldown: {cooldown}s}}"
    extra = fake_provider(fake, "fragile", "fragile.test", retry="{attempts: 1}", circuit=circuit)
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    url = "https://fragile.test/flaky/z/2"  # fails twice, then answers 200

    def get() -> str:
        return curl(proxy, "-i", url).stdout

    assert " 503 " in get().splitlines()[0]
    opened_after = time.monotonic()
    assert " 503 " in get().splitlines()[0]  # two failures: open
    refused = get()
    assert '"circuit_open"' in refused, f"{time.monotonic() - opened_after:.1f} s after the failure: {refused}"
    # Retry-After is the rest of the cooldown, rounded up: 1..cooldown s whatever the machine's speed.
    [retry_after] = [line.split(":")[1] for line in refused.lower().splitlines() if line.startswith("retry-after:")]
    assert 1 <= int(retry_after) <= cooldown
    assert len(paths(fake, "/flaky/z")) == 2  # refused without touching the upstream
    assert other_provider_still_works(proxy)
    # Refused (never reaching the upstream) until the cooldown has passed; then one probe succeeds.
    assert first_after_the_cooldown(proxy, url, opened_after, cooldown).status == 200
    assert " 200 " in get().splitlines()[0]  # closed again
    assert len(paths(fake, "/flaky/z")) == 4


def other_provider_still_works(proxy: SidekeyProcess) -> bool:
    """Same upstream host, another provider: its own circuit, still closed."""
    return curl(proxy, "-s", "-o", "/dev/null", "-w", "%{http_code}", "https://retry.test/echo").stdout == "200"


def test_stream_death_sends_an_sse_error_event_when_asked(
    start_sidekey: object, fake: FakeProviderThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    import openai

    from tests.integration.conftest import PLACEHOLDER

    extra = fake_provider(fake, "ssestream", "sse.test", sse_error_event="true")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(proxy.ca_path))
    client = openai.OpenAI(api_key=PLACEHOLDER, base_url="https://sse.test/v1", max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], stream=True,
        extra_headers={"x-fake-cut-after": "2"},
    )  # fmt: skip
    with pytest.raises(openai.APIError) as info:
        for _ in stream:
            pass
    # Our in-band event, not merely the cut connection (that would be APIConnectionError).
    assert not isinstance(info.value, openai.APIConnectionError)
    assert "upstream_disconnected" in str(info.value.body)


def test_providers_endpoint_shows_circuit_state(start_sidekey: object, fake: FakeProviderThread) -> None:
    import httpx

    extra = fake_provider(
        fake, "fragile", "fragile.test", retry="{attempts: 1}", circuit="{failures: 1, cooldown: 60s}"
    )
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    curl(proxy, "-s", "-o", "/dev/null", "https://fragile.test/flaky/q/1")
    providers = {p["name"]: p for p in httpx.get(proxy.admin_url + "/providers", trust_env=False).json()["providers"]}
    [member] = providers["fragile"]["upstreams"]
    assert member["upstream"] == f"localhost:{fake.port}"
    assert member["circuit"] == {"state": "open", "consecutive_failures": 1, "opens": 1}
    assert (member["healthy"], member["requests"], member["failures"], member["last_status"]) == (False, 1, 1, 503)
    assert member["secret"] == "env:SIDEKEY_TEST_KEY" or member["secret"].startswith("env:")
    # Listed before any traffic (its address is fixed), closed and healthy.
    [idle] = providers["openai"]["upstreams"]
    assert (idle["name"], idle["requests"], idle["healthy"], idle["circuit"]["state"]) == ("default", 0, True, "closed")
