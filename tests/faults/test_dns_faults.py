"""Names that do not resolve, and targets that are a cloud metadata address:
through an unmatched tunnel and as a provider's upstream."""

from __future__ import annotations

import json
import socket

import pytest

from tests.faults.conftest import StartProxy, assert_clean_after, curl_status, fault_policy
from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import assert_back_to, holdings
from tests.integration.sidekey_process import SidekeyProcess

# RFC 6761 §6.4: .invalid never resolves, so no DNS server is asked for a real name.
NOWHERE = "no-such-host.invalid"


def extra_providers() -> str:
    return f"""\
  unresolvable:
    hosts: [unresolvable.test]
    upstream: https://{NOWHERE}
    auth: {{type: bearer, secret: env:OPENAI_API_KEY}}
    retry: {{attempts: 1}}
    circuit: {{failures: 0}}
  metadata:
    hosts: [metadata.test]
    upstream: https://169.254.169.254
    auth: {{type: bearer, secret: env:OPENAI_API_KEY}}
    retry: {{attempts: 1}}
    circuit: {{failures: 0}}
"""


@pytest.fixture
def proxy(start_proxy: StartProxy, fault: FaultUpstream, stalled: FaultUpstream) -> SidekeyProcess:
    return start_proxy(fault_policy(fault, stalled) + extra_providers())


def raw_connect(proxy: SidekeyProcess, authority: str) -> tuple[str, dict[str, object]]:
    """CONNECT through sidekey as an app does; (status line, JSON error body).
    A refusal is a whole answer with a length and a close, so read to EOF."""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as sock:
        sock.sendall(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        answer = b""
        while piece := sock.recv(65536):
            answer += piece
    head, _, body = answer.decode(errors="replace").partition("\r\n\r\n")
    return head.splitlines()[0], json.loads(body)


@pytest.mark.parametrize(
    ("authority", "status", "code"),
    [
        ("169.254.169.254:80", "403", "address_blocked"),  # IMDS, by address
        ("[::ffff:169.254.169.254]:80", "403", "address_blocked"),  # the same host, IPv4-mapped
        (f"{NOWHERE}:443", "502", "upstream_connect_error"),  # DNS failure
    ],
)
def test_unmatched_tunnel_to_metadata_or_nowhere_is_refused(
    proxy: SidekeyProcess, authority: str, status: str, code: str
) -> None:
    baseline = assert_back_to(proxy, holdings(proxy))
    line, body = raw_connect(proxy, authority)
    assert f" {status} " in line, line
    assert body["error"]["code"] == code  # type: ignore[index]
    assert_clean_after(proxy, baseline, json.dumps(body))


@pytest.mark.parametrize(
    ("url", "status", "code"),
    [
        ("https://unresolvable.test/v1/models", "502", "upstream_connect_error"),
        ("https://metadata.test/latest/meta-data/", "403", "address_blocked"),
    ],
)
def test_provider_upstream_unresolvable_or_metadata_is_refused(
    proxy: SidekeyProcess, url: str, status: str, code: str
) -> None:
    curl_status(proxy, "https://faulty.test/ok")
    baseline = assert_back_to(proxy, holdings(proxy))
    got, body, err = curl_status(proxy, url)
    assert (got, json.loads(body)["error"]["code"]) == (status, code), body
    ok, _, _ = curl_status(proxy, "https://faulty.test/ok")  # others unaffected
    assert ok == "200"
    assert_clean_after(proxy, baseline, body, err)
