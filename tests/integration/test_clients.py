"""Real clients through a real sidekey process to a fake provider over TLS.

Each client is configured only as an app would be: HTTPS_PROXY, a CA bundle
and a placeholder key.
"""

from __future__ import annotations

import json
import threading

import anthropic
import httpx
import openai
import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import (
    ANTHROPIC_KEY,
    OPENAI_KEY,
    PLACEHOLDER,
    QUERY_KEY,
    assert_no_secret,
    curl,
)
from tests.integration.sidekey_process import SidekeyProcess


def assert_only_real_key_upstream(fake: FakeProviderThread, header: str, value: str) -> None:
    seen = fake.headers_seen(header)
    assert seen and all(v == value for v in seen), "upstream did not get exactly the real key"
    for request in fake.received:
        assert PLACEHOLDER not in json.dumps(request.headers) + request.query


def test_openai_sdk_plain(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    client = openai.OpenAI(api_key=PLACEHOLDER)
    completion = client.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    parsed = completion.parse()
    assert parsed.choices[0].message.content
    assert parsed.usage is not None and parsed.usage.total_tokens > 0
    assert completion.headers["x-sidekey-request-id"]
    assert_only_real_key_upstream(fake, "authorization", f"Bearer {OPENAI_KEY}")
    assert fake.last().sni == "localhost"  # upstream TLS to the configured upstream host
    assert_no_secret(completion.http_response.text + json.dumps(dict(completion.headers)))


def test_openai_sdk_streams_events_before_the_stream_ends(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    fake.arm_gate()  # the fake pauses after the first event until released
    client = openai.OpenAI(api_key=PLACEHOLDER)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = iter(stream)
    first = next(chunks)  # arrives while the upstream is still holding the rest
    assert first.choices[0].delta.role == "assistant"
    threading.Timer(0.2, fake.release_gate).start()
    rest = list(chunks)
    text = "".join(c.choices[0].delta.content or "" for c in rest if c.choices)
    assert text.strip()
    assert rest[-1].usage is not None  # the final usage chunk came through
    assert_only_real_key_upstream(fake, "authorization", f"Bearer {OPENAI_KEY}")


def test_openai_sdk_without_a_ca_through_http_proxy(
    client_env: SidekeyProcess, fake: FakeProviderThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's no-CA path: HTTP_PROXY plus an http:// base URL. The app
    trusts nothing of sidekey's; sidekey still uses verified TLS upstream."""
    monkeypatch.delenv("HTTPS_PROXY")
    monkeypatch.delenv("SSL_CERT_FILE")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://api.openai.com/v1")
    client = openai.OpenAI(api_key=PLACEHOLDER, max_retries=0)
    completion = client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert completion.choices[0].message.content
    assert_only_real_key_upstream(fake, "authorization", f"Bearer {OPENAI_KEY}")
    assert fake.last().sni == "localhost"  # TLS on the upstream hop


def test_anthropic_sdk_plain_and_streaming(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    client = anthropic.Anthropic(api_key=PLACEHOLDER)
    message = client.messages.create(
        model="claude-fake-test", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].text  # type: ignore[union-attr]
    with client.messages.stream(
        model="claude-fake-test", max_tokens=64, messages=[{"role": "user", "content": "hi"}]
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.usage.output_tokens > 0
    assert_only_real_key_upstream(fake, "x-api-key", ANTHROPIC_KEY)
    assert fake.headers_seen("authorization") == []  # the SDK's placeholder bearer never went up


def test_curl_https_and_plain_http_forms(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    https = curl(client_env, "-i", "-H", f"Authorization: Bearer {PLACEHOLDER}", "https://api.openai.com/v1/models")
    plain = curl(client_env, "-i", "-H", f"x-api-key: {PLACEHOLDER}", "http://api.openai.com/v1/models")
    for result in (https, plain):
        assert result.returncode == 0, result.stderr
        assert "x-sidekey-request-id" in result.stdout.lower()
        assert '"object":"list"' in result.stdout.replace(" ", "")
        assert_no_secret(result.stdout)
    assert_only_real_key_upstream(fake, "authorization", f"Bearer {OPENAI_KEY}")
    assert fake.headers_seen("x-api-key") == []


def test_httpx_query_key_provider(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    with httpx.Client(proxy=client_env.url, verify=client_env.client_ssl_context()) as client:
        r = client.get(f"https://v1.query.test/echo?key={PLACEHOLDER}&q=1")
    assert r.status_code == 200
    assert fake.last().query == f"q=1&key={QUERY_KEY}"  # the caller's key removed, ours added
    assert QUERY_KEY not in str(r.url)


def test_redirect_is_returned_not_followed(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    with httpx.Client(proxy=client_env.url, verify=client_env.client_ssl_context()) as client:
        r = client.get("https://api.openai.com/redirect", params={"to": "https://evil.example.com/steal"})
    assert r.status_code == 302
    assert r.headers["location"] == "https://evil.example.com/steal"
    assert len(fake.received) == 1


def test_missing_secret_is_503_and_other_providers_work(start_sidekey: object, fake: FakeProviderThread) -> None:
    from tests.integration.conftest import policy_for

    proxy = start_sidekey(policy_for(fake), env={"ANTHROPIC_API_KEY": ANTHROPIC_KEY})  # type: ignore[operator]
    assert "OPENAI_API_KEY" in proxy.log()  # reported at start, by source
    missing = curl(proxy, "-i", "https://api.openai.com/v1/models")
    assert " 503 " in missing.stdout.splitlines()[0]
    assert '"credential_unavailable"' in missing.stdout
    ok = curl(proxy, "-s", "-o", "/dev/null", "-w", "%{http_code}", "https://api.anthropic.com/echo")
    assert ok.stdout == "200"
    assert all(r.path == "/echo" for r in fake.received)  # nothing went up for openai


def test_upstream_failures_become_json_errors(start_sidekey: object, fake: FakeProviderThread) -> None:
    from tests.integration.conftest import DOWN, extra_provider, policy_for

    proxy = start_sidekey(policy_for(fake, extra=extra_provider("down", "down.test", DOWN)))  # type: ignore[operator]
    refused = curl(proxy, "https://down.test/v1/models")
    body = json.loads(refused.stdout)["error"]
    assert body["code"] == "upstream_connect_error" and body["retryable"] is True and body["provider"] == "down"
    slow = curl(proxy, "-i", "https://api.openai.com/slow-headers?delay=8")  # read timeout is 5 s
    assert " 504 " in slow.stdout.splitlines()[0] and '"upstream_timeout"' in slow.stdout
    assert_no_secret(refused.stdout + slow.stdout + proxy.log())


def test_body_cut_mid_way_is_visible_to_the_client(client_env: SidekeyProcess) -> None:
    cut = curl(client_env, "-o", "/dev/null", "https://api.openai.com/cut/200000")
    assert cut.returncode != 0  # curl: transfer closed with bytes remaining (18) or recv error (56)


def test_stream_cut_mid_answer_is_an_error_for_the_openai_sdk(client_env: SidekeyProcess) -> None:
    client = openai.OpenAI(api_key=PLACEHOLDER, max_retries=0)
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_headers={"x-fake-cut-after": "2"},
    )
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError, httpx.ReadError)):
        for _ in stream:
            pass


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["-I", "https://api.openai.com/bytes/1000"], "content-length: 1000"),
        (["-i", "https://api.openai.com/status/204"], " 204 "),
        (["-i", "https://api.openai.com/status/304"], " 304 "),
    ],
)
def test_bodiless_responses(client_env: SidekeyProcess, args: list[str], expect: str) -> None:
    result = curl(client_env, "-m", "5", *args)
    assert result.returncode == 0, result.stderr
    assert expect in result.stdout.lower()


def test_compressed_bytes_pass_untouched(client_env: SidekeyProcess) -> None:
    import hashlib

    with httpx.Client(proxy=client_env.url, verify=client_env.client_ssl_context()) as client:
        with client.stream("GET", "https://api.openai.com/gzip") as r:
            raw = b"".join(r.iter_raw())
            assert r.headers["content-encoding"] == "gzip"
            assert hashlib.sha256(raw).hexdigest() == r.headers["x-raw-sha256"]


def test_chunked_upload_and_expect_continue(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    import hashlib
    import subprocess

    payload = b"z" * 300_000
    cmd = [
        "curl", "-sS", "--noproxy", "", "-x", client_env.url, "--cacert", str(client_env.ca_path),
        "-H", "Transfer-Encoding: chunked", "-H", "Expect: 100-continue", "--data-binary", "@-",
        "https://api.openai.com/upload",
    ]  # fmt: skip
    result = subprocess.run(cmd, input=payload, capture_output=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer == {"size": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}


def test_no_secret_in_debug_logs(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    """Every path that touches a secret, at DEBUG: success, query keys, upstream
    errors, refusals. The process log must not contain any secret."""
    curl(client_env, "https://api.openai.com/v1/models")
    curl(client_env, "http://api.anthropic.com/echo")
    curl(client_env, f"https://x.query.test/echo?key={PLACEHOLDER}")
    curl(client_env, "https://x.query.test/status/500")
    curl(client_env, "-o", "/dev/null", "https://api.openai.com/cut/100000")
    curl(client_env, "-H", "Host: evil.test", "https://api.openai.com/echo")
    log = client_env.log()
    assert "DEBUG" in log or "INFO" in log  # the log is really being captured
    assert_no_secret(log)
