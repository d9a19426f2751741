"""Upstream faults, through a real sidekey to a scripted TLS upstream.

Each case asserts a defined answer (our JSON error with its documented code,
or a stream the client sees as broken), that the process stays up, that every
connection, fd and in-flight slot is given back, and that no secret shows in
what the client got or in the process log (DEBUG).
"""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest

from tests.faults.conftest import READ_TIMEOUT, assert_clean_after, curl_status
from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import Holdings
from tests.integration.conftest import PLACEHOLDER
from tests.integration.sidekey_process import SidekeyProcess


def error_code(body: str) -> str:
    return str(json.loads(body)["error"]["code"])


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/rst/before-headers", "502", "upstream_disconnected"),
        ("/rst/mid-headers", "502", "upstream_disconnected"),
    ],
)
def test_reset_before_the_answer_is_a_json_502(
    proxy: SidekeyProcess, baseline: Holdings, fault: FaultUpstream, path: str, status: str, code: str
) -> None:
    got, body, err = curl_status(proxy, f"https://faulty.test{path}", "-d", "{}")
    assert (got, error_code(body)) == (status, code), body
    assert len(fault.requests(path)) == 1  # attempts: 1, and the fault really happened
    ok, _, _ = curl_status(proxy, "https://faulty.test/ok")  # the next request is served
    assert ok == "200"
    assert_clean_after(proxy, baseline, body, err)


def test_reset_mid_body_is_a_json_502(proxy: SidekeyProcess, baseline: Holdings, fault: FaultUpstream) -> None:
    """A sized (non-streamed) answer is read whole before its head is sent on,
    so a reset in its body can still become our error instead of a short body."""
    got, body, err = curl_status(proxy, "https://faulty.test/rst/mid-body")
    assert (got, error_code(body)) == ("502", "upstream_disconnected"), body
    assert '"partial"' not in body  # nothing of the cut answer passed as if whole
    ok, _, _ = curl_status(proxy, "https://faulty.test/ok")
    assert ok == "200"
    assert_clean_after(proxy, baseline, body, err)


def test_reset_mid_stream_breaks_the_openai_sdk_stream(proxy: SidekeyProcess, baseline: Holdings) -> None:
    client = openai.OpenAI(
        api_key=PLACEHOLDER,
        base_url="https://faulty.test/rst/mid-stream",  # the SDK appends /chat/completions
        http_client=httpx.Client(proxy=proxy.url, verify=proxy.client_ssl_context(), timeout=20),  # type: ignore[arg-type]  # the openai SDK annotates httpx2.Client; an httpx.Client serves
        max_retries=0,
    )
    received: list[str] = []
    with pytest.raises((httpx.RemoteProtocolError, openai.APIError)):
        stream = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], stream=True)
        for chunk in stream:
            received.append(chunk.choices[0].delta.content or "")
    assert received == ["hi", "hi"]  # the events before the reset arrived, then the stream broke
    client.close()
    assert_clean_after(proxy, baseline, "".join(received))


def test_upstream_that_never_answers_is_a_504_after_the_read_timeout(
    proxy: SidekeyProcess, baseline: Holdings, fault: FaultUpstream
) -> None:
    started = time.monotonic()
    got, body, err = curl_status(proxy, "https://faulty.test/silent", "-d", "{}")
    elapsed = time.monotonic() - started
    assert (got, error_code(body)) == ("504", "upstream_timeout")
    # Not before the read timeout; the slack above it is the loaded machine.
    assert READ_TIMEOUT <= elapsed < READ_TIMEOUT + 8
    (seen,) = fault.requests("/silent")
    assert seen.peer_closed.wait(10)  # sidekey let go of the silent connection
    assert_clean_after(proxy, baseline, body, err)


def test_upstream_trickling_a_byte_a_second_is_relayed_whole(
    proxy: SidekeyProcess, baseline: Holdings, fault: FaultUpstream
) -> None:
    """Each byte comes within the read timeout (2 s), so the answer is slow
    but valid: it arrives complete, and nothing is held once it has."""
    started = time.monotonic()
    got, body, err = curl_status(proxy, "https://faulty.test/trickle")
    assert (got, body) == ("200", '{"a":1}')
    assert time.monotonic() - started >= 6  # 7 bytes, a second apart: really trickled
    assert_clean_after(proxy, baseline, body, err)


def test_tls_handshake_stall_is_a_timeout_within_the_connect_timeout(
    proxy: SidekeyProcess, baseline: Holdings, stalled: FaultUpstream
) -> None:
    started = time.monotonic()
    got, body, err = curl_status(proxy, "https://stalled.test/v1/models")
    elapsed = time.monotonic() - started
    assert got in ("502", "504"), body
    assert error_code(body) in ("upstream_timeout", "upstream_connect_error")
    assert elapsed < 10  # bounded by timeouts.connect (2 s), not hanging
    assert stalled.connections == 1
    assert_clean_after(proxy, baseline, body, err)
