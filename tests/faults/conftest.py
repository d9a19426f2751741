"""Fixtures for the fault matrix: scripted TLS upstreams on 127.0.0.1 and a
real sidekey process in front of them, with the leak probe's baseline taken
after one good request (so the pool, the leaf cert and lazy imports exist).

Every provider retries once at most (``attempts: 1``) and has its breaker off,
so each case sees exactly its own fault; the circuit case turns it on itself.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import Holdings, assert_alive, assert_back_to, holdings
from tests.integration.conftest import SECRET_ENV, SECRETS, curl
from tests.integration.sidekey_process import SidekeyProcess

READ_TIMEOUT = 2.0  # seconds; the policy's timeouts.read for the faulty providers
CONNECT_TIMEOUT = 2.0


def fault_policy(
    fault: FaultUpstream, stalled: FaultUpstream, *, circuit: str = "{failures: 0}", extra: str = ""
) -> str:
    def provider(name: str, host: str, upstream: FaultUpstream) -> str:
        return f"""\
  {name}:
    hosts: [{host}]
    upstream: https://localhost:{upstream.port}
    auth: {{type: bearer, secret: env:OPENAI_API_KEY}}
    tls: {{ca_bundle: {upstream.ca_pem_path}}}
    timeouts: {{connect: {CONNECT_TIMEOUT}, read: {READ_TIMEOUT}}}
    retry: {{attempts: 1}}
    circuit: {circuit}
"""

    return f"""\
version: 1
unmatched: tunnel
{extra}
providers:
{provider("faulty", "faulty.test", fault)}{provider("stalled", "stalled.test", stalled)}"""


@pytest.fixture
def fault(tmp_path: Path) -> Iterator[FaultUpstream]:
    upstream = FaultUpstream(tmp_path).start()
    yield upstream
    upstream.stop()


@pytest.fixture
def stalled(tmp_path: Path) -> Iterator[FaultUpstream]:
    (tmp_path / "stalled").mkdir()
    upstream = FaultUpstream(tmp_path / "stalled", stall_handshake=True).start()
    yield upstream
    upstream.stop()


StartProxy = Callable[..., SidekeyProcess]


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[StartProxy]:
    started: list[SidekeyProcess] = []

    def start(policy: str) -> SidekeyProcess:
        workdir = tmp_path / f"sidekey{len(started)}"
        workdir.mkdir()
        proc = SidekeyProcess(workdir, policy, env=SECRET_ENV)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def proxy(start_proxy: StartProxy, fault: FaultUpstream, stalled: FaultUpstream) -> SidekeyProcess:
    return start_proxy(fault_policy(fault, stalled))


@pytest.fixture
def baseline(proxy: SidekeyProcess) -> Holdings:
    """What sidekey holds after one good request through the faulty provider."""
    warm = curl(proxy, "https://faulty.test/ok")
    assert '"ok":true' in warm.stdout, warm.stderr
    return assert_back_to(proxy, holdings(proxy))


def assert_clean_after(
    proxy: SidekeyProcess, baseline: Holdings, *client_output: str, pooled_ports: frozenset[int] = frozenset()
) -> None:
    """The common tail of every case: alive, nothing leaked, no secret anywhere."""
    assert_alive(proxy)
    assert_back_to(proxy, baseline, pooled_ports=pooled_ports)
    for text in (*client_output, proxy.log()):
        for secret in SECRETS:
            assert secret not in text, "a secret leaked"


def curl_status(proxy: SidekeyProcess, url: str, *args: str, timeout: float = 30) -> tuple[str, str, str]:
    """(status, body, stderr) of one request through sidekey."""
    result: subprocess.CompletedProcess[str] = curl(
        proxy, "-s", "-o", "-", "-w", "\n%{http_code}", *args, url, timeout=timeout
    )
    body, _, status = result.stdout.rpartition("\n")
    return status, body, result.stderr
