"""A provider's ``tls.ca_bundle`` replaced on disk takes effect without a
restart or reload; a verification failure says which provider, member and CA
file failed; a pool trusting the old content drains before it closes."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import httpx
import trustme

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import PLACEHOLDER, assert_no_secret, curl
from tests.integration.sidekey_process import SidekeyProcess

# The CA files are checked every second (engine.POOL_CHECK_INTERVAL), off the
# loop; a loaded machine gets ten times that.
DEADLINE = 10.0


def policy(fake: FakeProviderThread, ca_file: Path) -> str:
    return f"""\
version: 1
providers:
  openai:
    hosts: [api.openai.com]
    upstream: https://localhost:{fake.port}
    auth: {{type: bearer, secret: env:OPENAI_API_KEY}}
    tls: {{ca_bundle: {ca_file}}}
    retry: {{attempts: 1}}
"""


def other_ca_pem() -> bytes:
    return trustme.CA().cert_pem.bytes()


def wait_for_log(proxy: SidekeyProcess, pattern: str, count: int = 1) -> None:
    deadline = time.monotonic() + DEADLINE
    while len(re.findall(pattern, proxy.log())) < count:
        assert time.monotonic() < deadline, f"no {pattern!r} in the log"
        time.sleep(0.05)


def admin_pools(proxy: SidekeyProcess) -> dict[str, object]:
    pools: dict[str, object] = httpx.get(proxy.admin_url + "/providers", timeout=5, trust_env=False).json()["pools"]
    return pools


def test_a_replaced_ca_file_takes_effect_without_restart(
    start_sidekey: object, fake: FakeProviderThread, tmp_path: Path
) -> None:
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(other_ca_pem())  # CA B: not the fake's
    proxy: SidekeyProcess = start_sidekey(policy(fake, ca_file))  # type: ignore[operator]

    refused = curl(proxy, "-i", "https://api.openai.com/v1/models")
    assert refused.stdout.startswith("HTTP/1.1 502 upstream_tls_error"), refused.stdout[:200]
    assert fake.received == []
    line = next(ln for ln in proxy.log().splitlines() if "TLS verification failed" in ln)
    assert f"upstream openai/default (localhost:{fake.port})" in line
    assert "the issuer is not in the trusted CAs" in line
    assert f"tls.ca_bundle {ca_file} (sha256 " in line

    # The same path now holds the fake's CA A, written in place (same inode).
    ca_file.write_bytes(Path(fake.ca_pem_path).read_bytes())
    wait_for_log(proxy, rf"tls.ca_bundle {re.escape(str(ca_file))} changed")
    served = curl(proxy, "-i", "https://api.openai.com/v1/models")
    assert served.stdout.startswith("HTTP/1.1 200"), served.stdout[:300]
    assert fake.last().path == "/v1/models"
    assert "policy reloaded" not in proxy.log()  # no reload, and the same process served both
    assert proxy.proc is not None and proxy.proc.poll() is None
    log = proxy.log()
    assert "BEGIN CERTIFICATE" not in log  # the certificate's bytes are never logged
    assert_no_secret(log)


def test_the_old_pool_lets_its_stream_finish_then_closes(
    start_sidekey: object, fake: FakeProviderThread, tmp_path: Path
) -> None:
    ca_file = tmp_path / "upstream-ca.pem"
    ca_file.write_bytes(Path(fake.ca_pem_path).read_bytes())
    proxy: SidekeyProcess = start_sidekey(policy(fake, ca_file))  # type: ignore[operator]
    fake.call(lambda p: p.arm_gate())  # the fake pauses after the first event until released
    events: list[str] = []
    done = threading.Event()

    def stream() -> None:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.Client(proxy=proxy.url, verify=proxy.client_ssl_context(), timeout=30, trust_env=False) as client:
            with client.stream(
                "POST", "https://api.openai.com/v1/chat/completions", json=body,
                headers={"authorization": f"Bearer {PLACEHOLDER}"},
            ) as r:  # fmt: skip
                events.extend(line[6:] for line in r.iter_lines() if line.startswith("data: "))
        done.set()

    worker = threading.Thread(target=stream)
    worker.start()
    try:
        deadline = time.monotonic() + DEADLINE
        while not fake.received and time.monotonic() < deadline:
            time.sleep(0.02)
        assert fake.received, "the stream did not start"
        # New content (the fake's CA plus another): a new identity, still trusting the fake.
        ca_file.write_bytes(Path(fake.ca_pem_path).read_bytes() + other_ca_pem())
        wait_for_log(proxy, "changed")
        served = curl(proxy, "-i", "https://api.openai.com/v1/models")
        assert served.stdout.startswith("HTTP/1.1 200"), served.stdout[:300]
        pools = admin_pools(proxy)
        assert pools["retiring"] == 1 and pools["sessions"] == 1  # the old pool still holds the stream
        assert not done.is_set()
    finally:
        fake.call(lambda p: p.release_gate())
        worker.join(DEADLINE)
    assert done.is_set() and events[-1] == "[DONE]"  # the whole stream, with its clean end
    deadline = time.monotonic() + DEADLINE
    while admin_pools(proxy)["retiring"] != 0:  # drained: closed at the next check
        assert time.monotonic() < deadline, "the retired pool was not closed"
        time.sleep(0.1)
    assert admin_pools(proxy)["sessions"] == 1
