"""An open circuit answers fast: 503 circuit_open latency measured under load.

The upstream is one that never answers, so an attempt that got through would
take at least the read timeout (2 s); every answer must come well before that,
and the upstream must see nothing once the circuit is open.
"""

from __future__ import annotations

import statistics
import threading
import time

import httpx
import pytest

from tests.faults.conftest import READ_TIMEOUT, StartProxy, assert_clean_after, curl_status, fault_policy
from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import assert_back_to, holdings
from tests.integration.conftest import PLACEHOLDER
from tests.integration.sidekey_process import SidekeyProcess

REQUESTS = 200
CONCURRENCY = 8


@pytest.fixture
def proxy(start_proxy: StartProxy, fault: FaultUpstream, stalled: FaultUpstream) -> SidekeyProcess:
    return start_proxy(fault_policy(fault, stalled, circuit="{failures: 2, cooldown: 120s}"))


def test_open_circuit_answers_503_fast_under_load(proxy: SidekeyProcess, fault: FaultUpstream) -> None:
    for _ in range(2):  # two timeouts open the breaker
        status, body, _ = curl_status(proxy, "https://faulty.test/silent", "-d", "{}")
        assert status == "504", body
    baseline = assert_back_to(proxy, holdings(proxy))
    latencies: list[float] = []
    answers: list[tuple[int, str, str | None]] = []
    lock = threading.Lock()

    def worker(count: int) -> None:
        with httpx.Client(proxy=proxy.url, verify=proxy.client_ssl_context(), timeout=30) as client:
            for _ in range(count):
                started = time.perf_counter()
                resp = client.post(
                    "https://faulty.test/silent", json={}, headers={"authorization": f"Bearer {PLACEHOLDER}"}
                )
                elapsed = time.perf_counter() - started
                with lock:
                    latencies.append(elapsed)
                    answers.append((resp.status_code, resp.json()["error"]["code"], resp.headers.get("retry-after")))

    threads = [threading.Thread(target=worker, args=(REQUESTS // CONCURRENCY,)) for _ in range(CONCURRENCY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(50)
    assert len(answers) == REQUESTS
    assert {(status, code) for status, code, _ in answers} == {(503, "circuit_open")}
    assert all(retry_after is not None and int(retry_after) > 0 for _, _, retry_after in answers)
    assert len(fault.requests("/silent")) == 2  # nothing went upstream while open
    ordered = sorted(latencies)
    p50, p99 = statistics.median(ordered), ordered[int(len(ordered) * 0.99) - 1]
    print(
        f"circuit_open latency over {REQUESTS} requests at c={CONCURRENCY}: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max {ordered[-1] * 1000:.1f} ms"
    )
    # An attempt that reached the silent upstream would take >= READ_TIMEOUT: every
    # answer well under it shows none waited on the upstream, even on a loaded machine.
    assert ordered[-1] < READ_TIMEOUT
    assert_clean_after(proxy, baseline)
