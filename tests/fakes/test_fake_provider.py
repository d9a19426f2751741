"""Self-test of the fake provider, driven directly (no proxy) by the real SDKs, httpx and curl."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import subprocess
import time
from collections.abc import Iterator

import anthropic
import httpx
import httpx2
import openai
import pytest
from anthropic.types import MessageParam
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes import FakeProvider, FakeProviderThread, bytes_sha256
from tests.fakes.provider import GZIP_SHA256

MSGS: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say hello please"}]
AMSGS: list[MessageParam] = [{"role": "user", "content": "say hello please"}]


@pytest.fixture
def fake() -> Iterator[FakeProviderThread]:
    with FakeProviderThread() as f:
        yield f


@pytest.fixture
def http(fake: FakeProviderThread) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=fake.base_url, verify=fake.client_ssl_context(), timeout=30) as c:
        yield c


# The installed SDKs (openai 3.x, anthropic 2.x) are built on httpx2 (an httpx fork), so
# they get httpx2 clients; plain httpx is used for raw HTTP checks.
@pytest.fixture
def oai(fake: FakeProviderThread) -> Iterator[openai.OpenAI]:
    hc = httpx2.Client(verify=fake.client_ssl_context(), timeout=30)
    with openai.OpenAI(base_url=fake.base_url + "/v1", api_key="k", http_client=hc, max_retries=0) as c:
        yield c


@pytest.fixture
def claude(fake: FakeProviderThread) -> Iterator[anthropic.Anthropic]:
    hc = httpx2.Client(verify=fake.client_ssl_context(), timeout=30)
    with anthropic.Anthropic(base_url=fake.base_url, api_key="ak", http_client=hc, max_retries=0) as c:
        yield c


def curl(fake: FakeProviderThread, *args: str) -> subprocess.CompletedProcess[bytes]:
    cmd = ["curl", "-sS", "--max-time", "5", "--cacert", str(fake.ca_pem_path), *args]
    return subprocess.run(cmd, capture_output=True, check=True, timeout=60)


# -- OpenAI -------------------------------------------------------------------------


def test_openai_sdk_plain(fake: FakeProviderThread, oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
    assert r.object == "chat.completion" and r.model == "gpt-4o-mini"
    assert r.choices[0].message.content == "Hello from fake openai"
    assert r.choices[0].finish_reason == "stop"
    assert r.usage is not None and (r.usage.prompt_tokens, r.usage.completion_tokens) == (3, 4)
    assert r.usage.total_tokens == 7
    rec = fake.last()
    assert (rec.method, rec.path, rec.sni) == ("POST", "/v1/chat/completions", "localhost")
    assert rec.header("authorization") == "Bearer k"
    assert rec.host_header == f"localhost:{fake.port}"
    assert isinstance(rec.body_json, dict) and rec.body_json["model"] == "gpt-4o-mini" and rec.body_complete
    assert fake.headers_seen("Authorization") == ["Bearer k"]


def test_openai_sdk_stream_with_usage(fake: FakeProviderThread, oai: openai.OpenAI) -> None:
    stream = oai.chat.completions.create(
        model="gpt-4o",
        messages=MSGS,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from fake openai"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 4
    body = fake.last().body_json
    assert isinstance(body, dict) and body["stream"] is True


def test_openai_models_and_expected_key(fake: FakeProviderThread, oai: openai.OpenAI) -> None:
    assert "gpt-4o-mini" in [m.id for m in oai.models.list()]
    fake.expected_key = "right"
    with pytest.raises(openai.AuthenticationError) as ei:
        oai.chat.completions.create(model="m", messages=MSGS)
    assert ei.value.status_code == 401 and ei.value.code == "invalid_api_key"
    with oai.with_options(api_key="right") as ok:
        assert ok.chat.completions.create(model="m", messages=MSGS).choices


# -- Anthropic ----------------------------------------------------------------------


def test_anthropic_sdk_plain(fake: FakeProviderThread, claude: anthropic.Anthropic) -> None:
    m = claude.messages.create(model="claude-x", max_tokens=50, messages=AMSGS)
    assert m.type == "message" and m.model == "claude-x" and m.stop_reason == "end_turn"
    assert m.content[0].type == "text" and m.content[0].text == "Hello from fake anthropic"
    assert (m.usage.input_tokens, m.usage.output_tokens) == (3, 4)
    rec = fake.last()
    # anthropic SDK 2.x sends the API key as a Bearer token, not as x-api-key
    assert rec.path == "/v1/messages" and rec.header("authorization") == "Bearer ak"
    assert rec.header("anthropic-version")  # recorded (not required by the fake)


def test_anthropic_sdk_stream_helper(claude: anthropic.Anthropic) -> None:
    with claude.messages.stream(model="claude-x", max_tokens=50, messages=AMSGS) as s:
        pieces = list(s.text_stream)
        final = s.get_final_message()
    assert "".join(pieces) == "Hello from fake anthropic" and len(pieces) == 4
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 4)


def test_anthropic_sdk_create_stream(fake: FakeProviderThread, claude: anthropic.Anthropic) -> None:
    stream = claude.messages.create(model="claude-x", max_tokens=50, messages=AMSGS, stream=True)
    types = [e.type for e in stream]  # the SDK drops "ping"
    assert types == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    fake.expected_key = "right"
    with pytest.raises(anthropic.AuthenticationError) as ei:
        claude.messages.create(model="claude-x", max_tokens=5, messages=AMSGS)
    assert ei.value.body == {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}


def test_raw_anthropic_sse_framing(http: httpx.Client) -> None:
    body = {"model": "c", "max_tokens": 5, "stream": True, "messages": MSGS}
    r = http.post("/v1/messages", json=body)
    assert r.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = r.text.split("\n\n")
    assert events[-1] == "" and events[2] == 'event: ping\ndata: {"type":"ping"}'
    kind, data = events[0].split("\n")
    assert kind == "event: message_start" and json.loads(data[6:])["message"]["usage"]["input_tokens"] == 3


# -- gate / delay / cuts ------------------------------------------------------------


@pytest.mark.asyncio
async def test_gate_first_event_arrives_before_release() -> None:
    async with FakeProvider() as fake, httpx.AsyncClient(verify=fake.client_ssl_context(), timeout=30) as client:
        gate = fake.arm_gate()
        body = {"model": "m", "messages": MSGS, "stream": True}
        async with client.stream("POST", fake.url("/v1/chat/completions"), json=body) as r:
            lines = r.aiter_lines()
            first = await asyncio.wait_for(anext(lines), 30)
            assert json.loads(first[6:])["choices"][0]["delta"]["role"] == "assistant"
            assert await asyncio.wait_for(anext(lines), 30) == ""  # the event's blank line
            pending = asyncio.ensure_future(anext(lines))
            await asyncio.sleep(0.2)  # a window in which nothing may arrive (load only makes that likelier)
            assert not pending.done()  # the stream is held by the gate
            gate.set()
            rest = [await pending] + [line async for line in lines]
        assert "data: [DONE]" in rest


def test_gate_and_delay_via_thread(fake: FakeProviderThread, http: httpx.Client) -> None:
    fake.arm_gate()
    fake.stream_delay = 0.02
    with http.stream("POST", "/v1/chat/completions", json={"model": "m", "messages": MSGS, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: {")
        t0 = time.monotonic()
        fake.call(lambda p: p.release_gate())  # runs on the fake's loop
        rest = [x for x in lines if x]
    assert rest[-1] == "data: [DONE]" and len(rest) == 6
    assert time.monotonic() - t0 >= 0.1  # 6 events, 20 ms apart


def test_sse_cut_after(fake: FakeProviderThread, http: httpx.Client) -> None:
    got: list[str] = []
    body = {"model": "m", "messages": MSGS, "stream": True}
    with pytest.raises(httpx.RemoteProtocolError):  # noqa: SIM117
        with http.stream("POST", "/v1/chat/completions", json=body, headers={"x-fake-cut-after": "2"}) as r:
            for line in r.iter_lines():
                got += [line] if line else []
    assert len(got) == 2 and fake.last().aborted


def test_cut_body(fake: FakeProviderThread, http: httpx.Client) -> None:
    with pytest.raises(httpx.RemoteProtocolError), http.stream("GET", "/cut/100000") as r:
        assert r.headers["content-length"] == "200000"
        r.read()
    assert fake.last().aborted


@pytest.mark.asyncio
async def test_client_gone_recorded() -> None:
    async with FakeProvider() as fake, httpx.AsyncClient(verify=fake.client_ssl_context(), timeout=30) as client:
        fake.stream_delay = 0.05
        body = {"model": "m", "messages": MSGS, "stream": True}
        async with client.stream("POST", fake.url("/v1/chat/completions"), json=body) as r:
            await anext(r.aiter_lines())
        deadline = time.monotonic() + 60
        while not fake.last().client_gone:
            assert time.monotonic() < deadline, "the client's going was never recorded"
            await asyncio.sleep(0.02)


# -- generic endpoints --------------------------------------------------------------


def test_curl_bytes(fake: FakeProviderThread) -> None:
    n = 300_000
    plain = curl(fake, "-D", "-", fake.url(f"/bytes/{n}"))
    head, _, data = plain.stdout.partition(b"\r\n\r\n")
    assert f"content-length: {n}".encode() in head.lower()
    assert hashlib.sha256(data).hexdigest() == bytes_sha256(n)
    chunked = curl(fake, "-D", "-", fake.url(f"/bytes/{n}?chunked=1"))
    head, _, data = chunked.stdout.partition(b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head.lower() and b"content-length" not in head.lower()
    assert hashlib.sha256(data).hexdigest() == bytes_sha256(n)


def test_curl_echo_custom_hostname_sni() -> None:
    with FakeProviderThread(hostname="api.fake.test") as fake:
        host = f"api.fake.test:{fake.port}"
        args = ["--resolve", f"{host}:127.0.0.1", "-H", "X-Dup: 1", "-H", "X-Dup: 2", "-d", "hello"]
        echo = json.loads(curl(fake, *args, f"https://{host}/echo/a/b?q=1&q=2").stdout)
        rec = fake.last()
    assert (echo["method"], echo["path"], echo["query"]) == ("POST", "/echo/a/b", "q=1&q=2")
    assert echo["headers"]["x-dup"] == ["1", "2"] and echo["body_size"] == 5
    assert echo["body_sha256"] == hashlib.sha256(b"hello").hexdigest() == rec.body_sha256
    assert echo["sni"] == rec.sni == "api.fake.test" and rec.host_header == host


def test_upload_streamed(fake: FakeProviderThread, http: httpx.Client) -> None:
    piece = b"0123456789abcdef" * 4096  # 64 KiB

    def gen() -> Iterator[bytes]:
        for _ in range(40):
            yield piece

    r = http.post("/upload", content=gen())
    expect = hashlib.sha256(piece * 40).hexdigest()
    assert r.json() == {"size": 40 * len(piece), "sha256": expect}
    rec = fake.last()
    assert rec.header("transfer-encoding") == "chunked" and rec.body_json is None
    assert (rec.body_size, rec.body_sha256) == (40 * len(piece), expect)


def test_status_redirect_slow_gzip(http: httpx.Client) -> None:
    r = http.get("/status/418")
    assert r.status_code == 418 and r.json() == {"status": 418}
    r = http.get("/status/204")
    assert r.status_code == 204 and r.content == b""
    r = http.head("/status/503")
    assert r.status_code == 503 and r.content == b""
    r = http.get("/redirect", params={"to": "https://example.invalid/x"})
    assert r.status_code == 302 and r.headers["location"] == "https://example.invalid/x"
    t0 = time.monotonic()
    assert http.get("/slow-headers", params={"delay": "0.2"}).status_code == 200
    assert time.monotonic() - t0 >= 0.2
    with http.stream("GET", "/gzip") as r:
        raw = b"".join(r.iter_raw())
    assert r.headers["content-encoding"] == "gzip"
    assert hashlib.sha256(raw).hexdigest() == r.headers["x-raw-sha256"] == GZIP_SHA256
    assert json.loads(gzip.decompress(raw))["fake"] == "gzip"
