"""WebSocket through sidekey (#14): a real ``websockets`` client through the
proxy (CONNECT, sidekey's CA) to the fake provider's ``/v1/realtime`` over
TLS; sidekey injects the key on the upgrade and relays the session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from tests.fakes.provider_thread import FakeProviderThread
from tests.integration.conftest import OPENAI_KEY, PLACEHOLDER, assert_no_secret, curl, fake_provider, policy_for
from tests.integration.sidekey_process import SidekeyProcess

pytestmark = pytest.mark.asyncio

URL = "wss://api.openai.com/v1/realtime?model=gpt-realtime"


def ws_connect(proxy: SidekeyProcess, url: str = URL, **options: object) -> connect:
    """A client as an app makes it: sidekey as HTTPS proxy, its CA trusted, a placeholder key."""
    options.setdefault("additional_headers", {"Authorization": f"Bearer {PLACEHOLDER}"})
    options.setdefault("max_size", None)
    options.setdefault("compression", None)
    return connect(url, proxy=proxy.url, ssl=proxy.client_ssl_context(), open_timeout=60, **options)  # type: ignore[arg-type]


async def closed_code(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Wait for the session to end; the close code and reason the client saw (1006: no close frame)."""
    with pytest.raises(ConnectionClosed):
        async with asyncio.timeout(60):
            while True:
                await ws.recv()
    return ws.close_code, ws.close_reason


async def upstream_close_code(fake: FakeProviderThread) -> int | None:
    """The code the fake's last session was closed with, once its handler has seen the close
    (it may finish after the client's side did)."""
    session = fake.provider.ws_sessions[-1]
    deadline = time.monotonic() + 60  # a poll: the fake's handler runs on the fake's own loop
    for _ in range(100_000):
        if session.close_code is not None or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.05)
    return session.close_code


@pytest.fixture
def ws_sidekey(start_sidekey: object, fake: FakeProviderThread) -> SidekeyProcess:
    extra = fake_provider(fake, "nows", "nows.test", auth="{type: bearer, secret: env:OPENAI_API_KEY}")
    return start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator, no-any-return]


async def test_upgrade_injects_the_key_and_echoes(ws_sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    async with ws_connect(ws_sidekey) as ws:
        assert ws.response is not None
        assert ws.response.headers["x-sidekey-provider"] == "openai"
        await ws.send("hello")
        assert await ws.recv() == "hello"
        await ws.send(b"\x00\x01binary")
        assert await ws.recv() == b"\x00\x01binary"
    session = fake.provider.ws_sessions[-1]
    assert session.authorization == f"Bearer {OPENAI_KEY}"  # the caller's placeholder was replaced
    assert await upstream_close_code(fake) == 1000  # the client's close reached the upstream
    assert_no_secret(ws_sidekey.log())


@pytest.mark.parametrize(("code", "reason"), [(1000, "done"), (4001, "custom reason"), (1011, "")])
async def test_upstream_close_code_and_reason_relayed_exactly(
    ws_sidekey: SidekeyProcess, code: int, reason: str
) -> None:
    async with ws_connect(ws_sidekey) as ws:
        await ws.send(json.dumps({"type": "fake.close", "code": code, "reason": reason}))
        assert await closed_code(ws) == (code, reason)


async def test_client_close_code_relayed_upstream(ws_sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    async with ws_connect(ws_sidekey) as ws:
        await ws.send("x")
        await ws.recv()
        await ws.close(code=4003, reason="client says bye")
    assert await upstream_close_code(fake) == 4003


async def test_upstream_killed_mid_session_is_abnormal(ws_sidekey: SidekeyProcess) -> None:
    async with ws_connect(ws_sidekey) as ws:
        await ws.send(json.dumps({"type": "fake.die"}))
        code, _reason = await closed_code(ws)
    assert code in (1006, 1011)  # never a clean close


async def test_provider_without_websocket_answers_403(ws_sidekey: SidekeyProcess) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(ws_sidekey, "wss://api.anthropic.com/v1/realtime"):
            pass
    assert info.value.response.status_code == 403
    assert info.value.response.headers["x-sidekey-error"] == "websocket_not_allowed"


async def test_upstream_refusal_is_relayed_as_http(start_sidekey: object, fake: FakeProviderThread) -> None:
    fake.provider.expected_key = "sk-some-other-key"  # the fake refuses the injected key: 401
    proxy = start_sidekey(policy_for(fake))  # type: ignore[operator]
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(proxy):
            pass
    assert info.value.response.status_code == 401
    assert b"invalid_api_key" in info.value.response.body or b"error" in info.value.response.body


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, 1 << 20, 16 << 20])
async def test_frame_sizes(ws_sidekey: SidekeyProcess, size: int) -> None:
    payload = bytes(i % 251 for i in range(size))
    async with ws_connect(ws_sidekey) as ws:
        await ws.send(payload)
        assert await ws.recv() == payload


async def test_fragmented_message(ws_sidekey: SidekeyProcess) -> None:
    async with ws_connect(ws_sidekey) as ws:
        await ws.send(["frag", "mented ", "message"])
        assert await ws.recv() == "fragmented message"


async def test_ping_pong_under_load(ws_sidekey: SidekeyProcess) -> None:
    """Pings answered while 1 MiB messages stream both ways through the relay."""
    payload = bytes(range(256)) * 4096
    async with ws_connect(ws_sidekey) as ws:

        async def send() -> None:
            for _ in range(16):
                await ws.send(payload)

        async def receive() -> int:
            got = 0
            for _ in range(16):
                got += await ws.recv() == payload
            return got

        async def ping() -> int:
            for _ in range(20):
                await asyncio.wait_for(await ws.ping(), 60)
            return 20

        async with asyncio.timeout(120):
            _, echoed, pongs = await asyncio.gather(send(), receive(), ping())
        assert (echoed, pongs) == (16, 20)


async def test_permessage_deflate_negotiated_end_to_end_when_not_metering(
    ws_sidekey: SidekeyProcess, fake: FakeProviderThread
) -> None:
    async with ws_connect(ws_sidekey, compression="deflate") as ws:
        assert ws.response is not None
        assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        text = "compress me " * 1000
        await ws.send(text)
        assert await ws.recv() == text
    assert "permessage-deflate" in (fake.provider.ws_sessions[-1].extensions or "")


async def test_idle_timeout_closes_with_1001(start_sidekey: object, fake: FakeProviderThread) -> None:
    extra = fake_provider(fake, "idle", "idle.test", websocket="true", websocket_idle_timeout="1s")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    started = time.monotonic()
    async with ws_connect(proxy, "wss://idle.test/v1/realtime", ping_interval=None) as ws:
        assert await closed_code(ws) == (1001, "idle timeout")
    assert time.monotonic() - started >= 1.0


async def test_max_duration_closes_with_1001(start_sidekey: object, fake: FakeProviderThread) -> None:
    extra = fake_provider(fake, "short", "short.test", websocket="true", websocket_max_duration="2s")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    async with ws_connect(proxy, "wss://short.test/v1/realtime") as ws:
        started = time.monotonic()
        async with asyncio.timeout(60):
            try:
                while True:  # traffic keeps it from idling; only the duration ends it
                    await ws.send("tick")
                    await ws.recv()
                    await asyncio.sleep(0.1)
            except ConnectionClosed:
                pass
        assert (ws.close_code, ws.close_reason) == (1001, "session too long")
    assert time.monotonic() - started >= 1.0


async def test_concurrent_session_limit_answers_429_before_the_upgrade(
    start_sidekey: object, fake: FakeProviderThread
) -> None:
    extra = fake_provider(fake, "two", "two.test", websocket="true", limits="{concurrent_websockets: 2}")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    url = "wss://two.test/v1/realtime"
    async with ws_connect(proxy, url), ws_connect(proxy, url):
        before = len(fake.provider.ws_sessions)
        with pytest.raises(InvalidStatus) as info:
            async with ws_connect(proxy, url):
                pass
        assert info.value.response.status_code == 429
        assert info.value.response.headers["x-sidekey-error"] == "rate_limited"
        assert len(fake.provider.ws_sessions) == before  # nothing went upstream
    async with ws_connect(proxy, url) as ws:  # the slots came back
        await ws.send("again")
        assert await ws.recv() == "again"


async def test_sigterm_drain_closes_sessions_with_1001_after_the_grace(
    start_sidekey: object, fake: FakeProviderThread
) -> None:
    proxy = start_sidekey(policy_for(fake), args=("--grace", "2"))  # type: ignore[operator]
    async with ws_connect(proxy) as ws:
        await ws.send("before")
        assert await ws.recv() == "before"
        proxy.proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        await ws.send("during the grace")  # sessions run until the grace ends
        assert await ws.recv() == "during the grace"
        assert await closed_code(ws) == (1001, "sidekey is shutting down")
        assert time.monotonic() - signalled >= 1.5
    assert await upstream_close_code(fake) == 1001  # the upstream was told too


async def test_audit_and_access_lines_at_open_and_close(
    start_sidekey: object, fake: FakeProviderThread, tmp_path: Path
) -> None:
    audit = tmp_path / "audit.jsonl"
    proxy = start_sidekey(metered(fake), args=("--audit", str(audit)))  # type: ignore[operator]
    async with ws_connect(proxy, RT_URL) as ws:
        await ws.send(json.dumps({"type": "response.create"}))
        await wait_event(ws, "response.done")
        await ws.close(code=4000, reason="bye")
    proxy.stop()
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    sessions = [r for r in lines if r.get("websocket")]
    assert [r["websocket"]["event"] for r in sessions] == ["open", "close"]
    opened, closed = sessions
    assert opened["status"] == closed["status"] == 101 and opened["request_id"] == closed["request_id"]
    summary = closed["websocket"]
    assert (summary["ended_by"], summary["client_close_code"]) == ("client", 4000)
    assert summary["close_code"] == summary["upstream_close_code"] == 1000  # aiohttp's reply to a close
    assert summary["frames_up"] >= 2 and summary["frames_down"] >= 3 and summary["bytes_down"] > 0
    assert closed["tokens"]["input"] == 12 and closed["tokens"]["output"] == 45
    assert closed["duration_ms"] is not None
    text = proxy.log()
    assert "ws_event=open" in text and "ws_event=close ws_ended_by=client ws_close_code=1000" in text
    assert_no_secret(text)
    assert_no_secret(audit.read_text())


async def test_openai_sdk_realtime_client(client_env: SidekeyProcess, fake: FakeProviderThread) -> None:
    """The openai SDK's Realtime client as an app uses it: HTTPS_PROXY and SSL_CERT_FILE from the environment."""
    from openai import AsyncOpenAI

    client = AsyncOpenAI(api_key=PLACEHOLDER)
    try:
        async with client.realtime.connect(model="gpt-realtime") as conn:
            await conn.response.create()
            async with asyncio.timeout(60):
                async for event in conn:
                    if event.type == "response.done":
                        usage = event.response.usage
                        break
    finally:
        await client.close()
    assert usage is not None and (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (12, 45, 57)
    session = fake.provider.ws_sessions[-1]
    assert session.authorization == f"Bearer {OPENAI_KEY}"
    assert session.events == ["response.create"]
    assert_no_secret(client_env.log())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


async def test_200_concurrent_sessions_with_flat_memory(ws_sidekey: SidekeyProcess) -> None:
    async def one_round(n: int) -> int:
        async with contextlib.AsyncExitStack() as stack:
            sessions = await asyncio.gather(*(stack.enter_async_context(ws_connect(ws_sidekey)) for _ in range(n)))
            for i, ws in enumerate(sessions):
                await ws.send(f"session {i}")
            for i, ws in enumerate(sessions):
                assert await ws.recv() == f"session {i}"
            return _rss_kib(ws_sidekey.pid)  # all n open at once

    first = await one_round(200)
    second = await one_round(200)
    third = await one_round(200)
    # Flat: a round of 200 more sessions leaves nothing behind (each session's
    # buffers are a few 64 KiB pieces; 200 leaked sessions would add well over 16 MiB).
    assert third - first < 16 * 1024, (first, second, third)


def metered(fake: FakeProviderThread, **fields: str) -> str:
    extra = fake_provider(fake, "rt", "rt.test", websocket="true", websocket_usage="openai-realtime", **fields)
    return policy_for(fake, extra=extra)


RT_URL = "wss://rt.test/v1/realtime?model=gpt-4o-realtime-preview"


def chat_status(proxy: SidekeyProcess) -> int:
    body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20})
    result = curl(
        proxy,
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "-H",
        "content-type: application/json",
        "-d",
        body,
        "https://rt.test/v1/chat/completions",
    )
    return int(result.stdout)


async def usage_report(proxy: SidekeyProcess) -> dict[str, Any]:
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        answer = await client.get(proxy.admin_url + "/usage?provider=rt")
    assert answer.status_code == 200
    assert_no_secret(answer.text)
    return answer.json()  # type: ignore[no-any-return]


async def wait_event(ws: ClientConnection, kind: str) -> dict[str, object]:
    async with asyncio.timeout(60):
        while True:
            event = json.loads(await ws.recv())
            if event.get("type") == kind:
                return event  # type: ignore[no-any-return]


async def test_usage_from_response_done_goes_into_the_ledger(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy = start_sidekey(metered(fake))  # type: ignore[operator]
    async with ws_connect(proxy, RT_URL) as ws:
        for _ in range(3):
            await ws.send(json.dumps({"type": "response.create"}))
            done = await wait_event(ws, "response.done")
            assert done["response"]["usage"]["total_tokens"] == 57  # type: ignore[index]
    report = await usage_report(proxy)
    rows = {r["model"]: r for r in report["by"]}
    row = rows["gpt-4o-realtime-preview"]
    assert (row["requests"], row["input_tokens"], row["output_tokens"], row["cached_input_tokens"]) == (3, 36, 135, 12)


async def test_reserve_on_response_create_reconcile_on_response_done(
    start_sidekey: object, fake: FakeProviderThread
) -> None:
    """tokens_per_day 1,000: a held response reserving 990 leaves too little for a chat call (429);
    its response.done (57 tokens) gives back 933, and the same call passes, mid-session."""
    proxy = start_sidekey(metered(fake, limits="{tokens_per_day: 1000}", queue_wait="0"))  # type: ignore[operator]
    assert await asyncio.to_thread(chat_status, proxy) == 200  # room before the session (its usage is reconciled)
    async with ws_connect(proxy, RT_URL) as ws:
        hold = {"type": "response.create", "response": {"max_output_tokens": 990, "metadata": {"fake": "hold"}}}
        await ws.send(json.dumps(hold))
        await wait_event(ws, "response.created")  # the reservation was counted when the event passed
        assert await asyncio.to_thread(chat_status, proxy) == 429
        await ws.send(json.dumps({"type": "fake.finish"}))
        await wait_event(ws, "response.done")
        assert await asyncio.to_thread(chat_status, proxy) == 200


async def test_permessage_deflate_stripped_while_metering(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy = start_sidekey(metered(fake))  # type: ignore[operator]
    async with ws_connect(proxy, RT_URL, compression="deflate") as ws:
        assert ws.response is not None
        assert "permessage-deflate" not in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        await ws.send(json.dumps({"type": "response.create"}))
        await wait_event(ws, "response.done")
    assert fake.provider.ws_sessions[-1].extensions is None  # the offer never reached the upstream
    report = await usage_report(proxy)
    assert sum(r["output_tokens"] for r in report["by"]) == 45


async def test_metrics_for_sessions(ws_sidekey: SidekeyProcess) -> None:
    async with ws_connect(ws_sidekey) as ws:
        await ws.send(b"x" * 1000)
        await ws.recv()
        async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
            during = (await client.get(ws_sidekey.admin_url + "/metrics")).text
        await ws.send(json.dumps({"type": "fake.close", "code": 4001, "reason": "r"}))
        await closed_code(ws)
    async with httpx.AsyncClient(trust_env=False, timeout=30) as client:
        deadline = time.monotonic() + 60
        while True:  # the session's end is counted once sidekey saw both sides close
            after = (await client.get(ws_sidekey.admin_url + "/metrics")).text
            if (
                'sidekey_websocket_closes_total{code="4xxx",provider="openai"} 1.0' in after
                or time.monotonic() > deadline
            ):
                break
            await asyncio.sleep(0.1)
    assert 'sidekey_websocket_sessions_open{provider="openai"} 1.0' in during
    assert 'sidekey_websocket_closes_total{code="4xxx",provider="openai"} 1.0' in after
    assert "sidekey_websocket_sessions_opened_total 1.0" in after
    assert "sidekey_websocket_session_seconds_count 1.0" in after
    up = next(
        line for line in after.splitlines() if 'sidekey_websocket_bytes_total{direction="client_to_upstream"}' in line
    )
    assert float(up.rsplit(" ", 1)[1]) > 1000
    assert_no_secret(after)
