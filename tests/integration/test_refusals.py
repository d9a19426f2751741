"""Refusals a client can read: the error code in the status line of a refused
CONNECT (all curl and the SDKs show of it), and a fast, explained close for a
client that speaks TLS to the plain proxy port (``HTTPS_PROXY=https://...``)."""

from __future__ import annotations

import re
import socket
import ssl
import subprocess
import time

import httpx
import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import DOWN, curl, extra_provider, policy_for
from tests.integration.sidekey_process import SidekeyProcess

# The default limits.header_timeout: what a TLS client waited before sidekey
# closed on it. Sidekey now answers on the first byte (a few ms); half the
# timeout leaves a loaded machine ample room and still fails the old wait.
HEADER_TIMEOUT = 10.0
FAST = HEADER_TIMEOUT / 2
HINT = "use http:// in HTTPS_PROXY"


def curl_verbose(proxy_url: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Real curl through the proxy, -v so stderr carries the CONNECT answer's status line."""
    cmd = ["curl", "-sS", "-v", "--noproxy", "", "-x", proxy_url, "-o", "/dev/null", "--write-out", "%{http_connect}"]
    return subprocess.run([*cmd, *args, url], capture_output=True, text=True, timeout=30, check=False)


def connect_answer(stderr: str) -> tuple[str, dict[str, str]]:
    """The status line and headers curl -v printed for the CONNECT answer."""
    lines = [line[2:].strip() for line in stderr.splitlines() if line.startswith("< ")]
    status = next(line for line in lines if line.startswith("HTTP/"))
    headers = dict(line.split(": ", 1) for line in lines if ": " in line)
    return status, {k.lower(): v for k, v in headers.items()}


def refused(proxy: SidekeyProcess, url: str, code: str) -> None:
    result = curl_verbose(proxy.url, url)
    assert result.returncode == 56, result.stderr  # curl: CONNECT tunnel failed
    assert result.stdout == "403"  # --write-out %{http_connect}
    status, headers = connect_answer(result.stderr)
    assert status == f"HTTP/1.1 403 {code}"
    assert headers["x-sidekey-error"] == code


def test_unmatched_deny_names_the_code_in_the_connect_status_line(
    start_sidekey: object, fake: FakeProviderThread
) -> None:
    proxy = start_sidekey(policy_for(fake, unmatched="deny"))  # type: ignore[operator]
    refused(proxy, "https://denied.example/", "host_not_allowed")


def test_metadata_address_names_the_code_in_the_connect_status_line(sidekey: SidekeyProcess) -> None:
    # unmatched: tunnel (the fixture's policy): the address guard refuses it before any connect
    refused(sidekey, "https://169.254.169.254/latest/meta-data/", "address_blocked")


def test_own_listeners_name_the_code_in_the_connect_status_line(sidekey: SidekeyProcess) -> None:
    refused(sidekey, f"https://127.0.0.1:{sidekey.port}/", "address_blocked")
    refused(sidekey, f"https://127.0.0.1:{sidekey.admin_port}/metrics", "address_blocked")


def test_httpx_shows_the_code_of_a_refused_connect(start_sidekey: object, fake: FakeProviderThread) -> None:
    """httpx (under the openai and anthropic SDKs) raises ProxyError with the status line's text."""
    proxy = start_sidekey(policy_for(fake, unmatched="deny"))  # type: ignore[operator]
    with httpx.Client(proxy=proxy.url, trust_env=False) as client, pytest.raises(httpx.ProxyError) as info:
        client.get("https://denied.example/")
    assert str(info.value) == "403 host_not_allowed"


def test_sidekey_errors_inside_a_flow_carry_the_code_and_upstream_errors_do_not(
    start_sidekey: object, fake: FakeProviderThread
) -> None:
    extra = extra_provider("down", "down.test", DOWN, retry="{attempts: 1}")
    proxy = start_sidekey(policy_for(fake, extra=extra))  # type: ignore[operator]
    ours = curl(proxy, "-i", "https://down.test/v1/models")
    head = ours.stdout.split("\n\n")[0].lower()  # text mode: CRLF read as \n
    assert ours.stdout.startswith("HTTP/1.1 502 upstream_connect_error\n"), ours.stdout[:200]
    assert "\nx-sidekey-error: upstream_connect_error\n" in head
    assert '"code":"upstream_connect_error"' in ours.stdout  # the JSON body stays
    theirs = curl(proxy, "-i", "https://api.openai.com/status/503")
    assert theirs.stdout.startswith("HTTP/1.1 503 Service Unavailable\n"), theirs.stdout[:200]
    assert "x-sidekey-error" not in theirs.stdout.split("\n\n")[0].lower()


# -- a TLS client on the plain port --------------------------------------------------


def client_hello() -> bytes:
    """The bytes a real TLS client sends first (Python's ssl, as httpx would)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    assert hello[:1] == b"\x16"  # a handshake record
    return hello


def send_hello(port: int) -> tuple[bytes, float]:
    """Send a ClientHello to the plain port; what came back before the close, and how long it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=3 * HEADER_TIMEOUT) as s:
        started = time.monotonic()
        s.sendall(client_hello())
        answer = b""
        while piece := s.recv(65536):
            answer += piece
        return answer, time.monotonic() - started


def test_tls_client_on_the_plain_port_is_answered_and_closed_at_once(sidekey: SidekeyProcess) -> None:
    for _ in range(2):
        answer, took = send_hello(sidekey.port)
        assert took < FAST, f"closed after {took:.1f}s"
        assert answer.startswith(b"HTTP/1.1 400 tls_to_plain_port\r\n"), answer[:100]
        assert b'"code":"tls_to_plain_port"' in answer
    # the fix is logged once per process, however many clients get it wrong
    assert sidekey.log().count(HINT) == 1
    assert re.search(rf"spoke TLS to the plain proxy port {sidekey.port}: {HINT}", sidekey.log())
    # and the port still serves proxy requests
    assert curl(sidekey, "http://api.openai.com/v1/models").returncode == 0


def test_real_clients_with_an_https_proxy_url_fail_fast(sidekey: SidekeyProcess) -> None:
    https_proxy = f"https://127.0.0.1:{sidekey.port}"
    started = time.monotonic()
    result = subprocess.run(
        ["curl", "-sS", "--noproxy", "", "-x", https_proxy, "--proxy-insecure", "https://api.openai.com/v1/models"],
        capture_output=True, text=True, timeout=3 * HEADER_TIMEOUT, check=False,
    )  # fmt: skip
    assert time.monotonic() - started < FAST
    assert result.returncode == 35 and "wrong version number" in result.stderr  # curl: TLS connect error
    started = time.monotonic()
    with (
        httpx.Client(proxy=https_proxy, trust_env=False, timeout=3 * HEADER_TIMEOUT) as client,
        pytest.raises(httpx.ConnectError, match="WRONG_VERSION_NUMBER"),
    ):
        client.get("https://api.openai.com/v1/models")
    assert time.monotonic() - started < FAST
    assert sidekey.log().count(HINT) == 1
