"""Clients that misbehave: half requests held open (slowloris), and clients
that leave in the middle of an upload or of a streamed answer."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tests.faults.conftest import StartProxy, assert_clean_after, curl_status, fault_policy
from tests.faults.fault_upstream import FaultUpstream, Seen
from tests.faults.leaks import assert_back_to, holdings
from tests.integration.conftest import PLACEHOLDER
from tests.integration.sidekey_process import SidekeyProcess

HEADER_TIMEOUT = 2.0
SLOWLORIS = 64  # half requests held at once


@contextmanager
def tunnel(proxy: SidekeyProcess, host: str) -> Iterator[ssl.SSLSocket]:
    """A CONNECT tunnel to ``host`` with TLS to sidekey's leaf, as an app opens it."""
    raw = socket.create_connection(("127.0.0.1", proxy.port), timeout=20)
    raw.sendall(f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode())
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += raw.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200"), answer
    tls = proxy.client_ssl_context().wrap_socket(raw, server_hostname=host)
    try:
        yield tls
    finally:
        tls.close()


def wait_for(fault: FaultUpstream, path: str, *, deadline: float = 20.0) -> Seen:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        seen = fault.requests(path)
        if seen:
            return seen[0]
        time.sleep(0.05)
    raise AssertionError(f"the upstream never saw {path}")


def _peak_fds(proxy: SidekeyProcess, enough: int, *, deadline: float) -> int:
    """The most descriptors seen open until ``enough`` is reached or ``deadline`` passes."""
    end, peak = time.monotonic() + deadline, 0
    while time.monotonic() < end and peak < enough:
        peak = max(peak, holdings(proxy).fds)
        time.sleep(0.05)
    return peak


@pytest.fixture
def proxy(start_proxy: StartProxy, fault: FaultUpstream, stalled: FaultUpstream) -> SidekeyProcess:
    limits = f"limits: {{header_timeout: {HEADER_TIMEOUT}s, body_timeout: 5s}}"
    return start_proxy(fault_policy(fault, stalled, extra=limits))


def test_slowloris_half_requests_are_closed_and_others_still_served(proxy: SidekeyProcess) -> None:
    curl_status(proxy, "https://faulty.test/ok")
    baseline = assert_back_to(proxy, holdings(proxy))
    loris: list[socket.socket] = []
    try:
        for _ in range(SLOWLORIS):
            sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
            sock.sendall(b"CONNECT faulty.test:443 HTTP/1.1\r\nHost: faul")  # and nothing more
            loris.append(sock)
        started = time.monotonic()
        # They really are held open. A loaded sidekey accepts them over a while (one CI run
        # had accepted 8 of 64 when first asked), so poll for the peak rather than read once.
        assert _peak_fds(proxy, baseline.fds + SLOWLORIS // 2, deadline=HEADER_TIMEOUT + 10) >= (
            baseline.fds + SLOWLORIS // 2
        )
        status, body, _ = curl_status(proxy, "https://faulty.test/ok")  # served alongside them
        assert status == "200" and json.loads(body)["ok"] is True
        for sock in loris:  # each is closed by sidekey's header timeout, with no answer
            assert sock.recv(4096) == b""
        elapsed = time.monotonic() - started
    finally:
        for sock in loris:
            sock.close()
    # Not held past the header timeout (2 s) plus scheduling slack on a loaded machine.
    assert elapsed < HEADER_TIMEOUT + 10
    assert_clean_after(proxy, baseline, body)


def test_client_gone_mid_upload_cancels_the_upstream_request(proxy: SidekeyProcess, fault: FaultUpstream) -> None:
    curl_status(proxy, "https://faulty.test/ok")
    baseline = assert_back_to(proxy, holdings(proxy))
    with tunnel(proxy, "faulty.test") as tls:
        head = (
            "POST /silent/upload HTTP/1.1\r\nHost: faulty.test\r\n"
            f"Authorization: Bearer {PLACEHOLDER}\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        tls.sendall(head.encode())
        chunk = b"x" * 16384
        for _ in range(8):
            tls.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        seen = wait_for(fault, "/silent/upload")  # the upload is under way upstream
    # The client left without the last chunk: the upstream request is dropped.
    assert seen.peer_closed.wait(15), "sidekey kept the upstream upload open"
    status, body, err = curl_status(proxy, "https://faulty.test/ok")
    assert status == "200"
    assert json.loads(body)["conn"] != seen.conn_id  # the abandoned connection is not reused
    assert_clean_after(proxy, baseline, body, err)


def test_client_gone_mid_stream_cancels_the_upstream_stream(proxy: SidekeyProcess, fault: FaultUpstream) -> None:
    curl_status(proxy, "https://faulty.test/ok")
    baseline = assert_back_to(proxy, holdings(proxy))
    with tunnel(proxy, "faulty.test") as tls:
        head = f"POST /stream-forever HTTP/1.1\r\nHost: faulty.test\r\nAuthorization: Bearer {PLACEHOLDER}\r\n"
        tls.sendall((head + "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}").encode())
        got = b""
        while got.count(b"data: ") < 3:  # three events relayed: the stream is live
            piece = tls.recv(65536)
            assert piece, "the stream ended early"
            got += piece
        assert got.startswith(b"HTTP/1.1 200")
    (seen,) = fault.requests("/stream-forever")
    assert seen.peer_closed.wait(15), "sidekey kept streaming from the upstream after the client left"
    status, body, err = curl_status(proxy, "https://faulty.test/ok")
    assert status == "200"
    assert json.loads(body)["conn"] != seen.conn_id  # the half-read connection is not reused
    assert_clean_after(proxy, baseline, body, err, got.decode(errors="replace"))
