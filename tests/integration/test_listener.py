"""The listener against raw sockets: bad input, limits, refusals, routing rules."""

from __future__ import annotations

import json
import socket
import ssl
import time

import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import OPENAI_KEY, assert_no_secret, curl, extra_provider, policy_for
from tests.integration.sidekey_process import SidekeyProcess


def exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send raw bytes, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            try:
                piece = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not piece:
                break
            chunks.append(piece)
    return b"".join(chunks)


def status_and_json(raw: bytes) -> tuple[int, dict[str, object]]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)


def connect_tls(proxy: SidekeyProcess, host: str, sni: str | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    reply = raw.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200"), reply
    ctx = ssl.create_default_context(cafile=str(proxy.ca_path))
    ctx.check_hostname = sni == host
    return ctx.wrap_socket(raw, server_hostname=sni or host)


def read_response(tls: ssl.SSLSocket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += tls.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int([ln.split(b":")[1] for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length")][0])
    while len(body) < length:
        body += tls.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"hello\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 400),  # origin-form to a proxy: not a proxy request
        (b"GET http://api.openai.com/ HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"CONNECT api.openai.com HTTP/1.1\r\n\r\n", 400),  # no port
        (b"GET ftp://x/ HTTP/1.1\r\n\r\n", 400),
        (b"POST http://api.openai.com/v1 HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET http://api.openai.com/ HTTP/1.1\r\n" + b"X-Big: " + b"a" * 70000 + b"\r\n\r\n", 431),
        (b"GET http://api.openai.com/ HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(101)) + b"\r\n", 431),
        (b"POST http://api.openai.com/ HTTP/1.1\r\nContent-Length: 99999999999\r\n\r\n", 413),
    ],
)
def test_bad_input_gets_a_clear_error_and_a_close(sidekey: SidekeyProcess, data: bytes, status: int) -> None:
    got_status, body = status_and_json(exchange(sidekey.port, data))
    assert got_status == status
    assert isinstance(body["error"], dict) and body["error"]["code"]
    # and the process is still serving
    assert curl(sidekey, "http://api.openai.com/v1/models").returncode == 0


def test_chunked_body_over_the_limit_is_413(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy = start_sidekey(policy_for(fake, limits="limits: {max_body_bytes: 1000}"))  # type: ignore[operator]
    data = b"POST http://api.openai.com/upload HTTP/1.1\r\nHost: api.openai.com\r\nTransfer-Encoding: chunked\r\n\r\n"
    data += b"400\r\n" + b"x" * 1024 + b"\r\n0\r\n\r\n"
    status, body = status_and_json(exchange(proxy.port, data))
    assert status == 413 and body["error"]["code"] == "body_too_large"  # type: ignore[index]


def test_slow_client_times_out(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy = start_sidekey(policy_for(fake, limits="limits: {header_timeout: 0.5, idle_timeout: 0.5}"))  # type: ignore[operator]
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        s.sendall(b"GET http://api.openai.com/v1/models HTTP/1.1\r\n")  # never finishes the head
        started = time.monotonic()
        assert s.recv(100) == b""  # closed by sidekey
        # The 0.5 s set here, not the 10 s default header_timeout: under that whatever the load.
        assert time.monotonic() - started < 5


def test_unmatched_deny_is_403_with_reason(start_sidekey: object, fake: FakeProviderThread) -> None:
    proxy = start_sidekey(policy_for(fake, unmatched="deny"))  # type: ignore[operator]
    status, body = status_and_json(exchange(proxy.port, b"CONNECT example.org:443 HTTP/1.1\r\n\r\n"))
    assert status == 403
    assert body["error"]["code"] == "host_not_allowed"  # type: ignore[index]
    assert "example.org" in body["error"]["message"]  # type: ignore[index]
    status, _ = status_and_json(exchange(proxy.port, b"GET http://example.org/ HTTP/1.1\r\nHost: example.org\r\n\r\n"))
    assert status == 403


def test_unmatched_tunnel_relays_blindly(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    """CONNECT to the fake directly (no policy matches 127.0.0.1): the client
    sees the fake's own certificate and no credential is added."""
    result = subprocess_curl_tunnel(sidekey, fake)
    assert result.returncode == 0, result.stderr
    echoed = json.loads(result.stdout)
    assert "authorization" not in {k.lower() for k in echoed["headers"]}


def subprocess_curl_tunnel(proxy: SidekeyProcess, fake: FakeProviderThread):  # type: ignore[no-untyped-def]
    import subprocess

    cmd = [
        "curl", "-sS", "--noproxy", "", "-x", proxy.url, "--cacert", str(fake.ca_pem_path),
        f"https://127.0.0.1:{fake.port}/echo",
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, timeout=20, check=False)


@pytest.mark.parametrize("target", ["169.254.169.254:80", "[fd00:ec2::254]:80", "[::ffff:169.254.169.254]:80"])
def test_metadata_address_refused_for_tunnels(sidekey: SidekeyProcess, target: str) -> None:
    status, body = status_and_json(exchange(sidekey.port, f"CONNECT {target} HTTP/1.1\r\n\r\n".encode()))
    assert status == 403 and body["error"]["code"] == "address_blocked"  # type: ignore[index]


def test_metadata_address_refused_for_upstreams(start_sidekey: object, fake: FakeProviderThread) -> None:
    extra = extra_provider("metadata", "meta.test", "https://169.254.169.254")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    result = curl(proxy, "-i", "https://meta.test/latest/meta-data/")
    assert "403" in result.stdout.splitlines()[0]
    assert '"address_blocked"' in result.stdout
    assert_no_secret(result.stdout + proxy.log())


def test_host_header_disagreeing_with_connect_is_421(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    tls = connect_tls(sidekey, "api.openai.com")
    tls.sendall(b"GET /v1/models HTTP/1.1\r\nHost: evil.example.com\r\n\r\n")
    reply = read_response(tls)
    assert reply.startswith(b"HTTP/1.1 421"), reply[:100]
    assert b"host_mismatch" in reply
    tls.close()
    tls = connect_tls(sidekey, "api.openai.com")
    tls.sendall(b"GET https://evil.example.com/v1/models HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
    assert read_response(tls).startswith(b"HTTP/1.1 421")
    tls.close()
    assert fake.received == []  # nothing went upstream


def test_sni_disagreeing_with_connect_fails_the_handshake(sidekey: SidekeyProcess) -> None:
    with pytest.raises((ssl.SSLError, ConnectionResetError, OSError)):
        connect_tls(sidekey, "api.openai.com", sni="evil.example.com").sendall(b"GET / HTTP/1.1\r\n\r\n")


def test_keep_alive_serves_many_requests_on_one_connection(sidekey: SidekeyProcess, fake: FakeProviderThread) -> None:
    tls = connect_tls(sidekey, "api.openai.com")
    for _ in range(3):
        tls.sendall(b"GET /echo HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer placeholder\r\n\r\n")
        reply = read_response(tls)
        assert reply.startswith(b"HTTP/1.1 200")
        assert b"x-sidekey-request-id" in reply.lower()
    tls.close()
    assert fake.headers_seen("authorization") == [f"Bearer {OPENAI_KEY}"] * 3


def read_stream_records(tls: ssl.SSLSocket, until: bytes) -> list[bytes]:
    """What each ``recv`` returned (one TLS record's data at most) until ``until`` was seen."""
    records: list[bytes] = []
    while until not in b"".join(records):
        piece = tls.recv(65536)
        assert piece, b"".join(records)[-300:]
        records.append(piece)
    return records


@pytest.mark.parametrize("end_with_last", [True, False])
def test_a_stream_whose_upstream_ends_with_its_last_event_ends_in_the_same_record(
    sidekey: SidekeyProcess, fake: FakeProviderThread, end_with_last: bool
) -> None:
    """A client that stops reading at ``[DONE]`` has then seen the end of the body too, and
    may keep its connection. When the upstream sends its terminator later (held by the fake's
    gate until the client has read ``[DONE]``), it goes on its own, and the connection still
    serves the next request."""
    tls = connect_tls(sidekey, "api.openai.com")
    body = b'{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}'
    knob = b"x-fake-end-with-last: 1\r\n" if end_with_last else b"x-fake-gate-at-end: 1\r\n"
    if not end_with_last:
        fake.arm_gate()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer placeholder\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (len(body), knob, body)
    )
    tls.sendall(request)
    records = read_stream_records(tls, b"data: [DONE]")
    assert b"transfer-encoding: chunked" in records[0].lower()
    if end_with_last:
        assert records[-1].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")
    else:
        assert records[-1].endswith(b"data: [DONE]\n\n\r\n")
        fake.release_gate()
        fake.disarm_gate()
        assert read_stream_records(tls, b"0\r\n\r\n") == [b"0\r\n\r\n"]
    tls.sendall(b"GET /echo HTTP/1.1\r\nHost: api.openai.com\r\nAuthorization: Bearer placeholder\r\n\r\n")
    assert read_response(tls).startswith(b"HTTP/1.1 200")  # the same connection, after the stream
    tls.close()
