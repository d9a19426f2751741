"""200 policy reloads under load: every request answered, nothing left behind.

Each reload changes the faulty provider's pool settings (``max_connections``
50, 51, 52, ...), so each makes its upstream pool a new identity: the old pool must
be retired and closed once its requests finish. Before, every such pool
stayed open (73 left after 200 reloads). Four clients keep requests in
flight across every reload (each reload waits for new answers, not a sleep).
"""

from __future__ import annotations

import json
import threading
import time
import urllib.request

import httpx

from tests.faults.conftest import StartProxy, assert_clean_after, curl_status, fault_policy
from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import assert_back_to, holdings
from tests.integration.sidekey_process import SidekeyProcess

RELOADS = 200
CLIENTS = 4


def policy(fault: FaultUpstream, stalled: FaultUpstream, max_connections: int) -> str:
    return fault_policy(fault, stalled).replace(
        "    circuit: {failures: 0}\n",
        f"    circuit: {{failures: 0}}\n    pool: {{max_connections: {max_connections}}}\n",
        1,
    )


def pools(proxy: SidekeyProcess) -> dict[str, int]:
    with urllib.request.urlopen(proxy.admin_url + "/providers", timeout=10) as answer:
        stats = json.loads(answer.read())["pools"]
    return {"sessions": stats["sessions"], "retiring": stats["retiring"]}


def test_200_reloads_under_load_answer_every_request_and_leave_no_pool(
    start_proxy: StartProxy, fault: FaultUpstream, stalled: FaultUpstream
) -> None:
    proxy = start_proxy(policy(fault, stalled, 50))
    assert curl_status(proxy, "https://faulty.test/ok")[0] == "200"
    baseline = assert_back_to(proxy, holdings(proxy))
    assert pools(proxy) == {"sessions": 1, "retiring": 0}
    done = threading.Event()
    answered = [0]
    failures: list[str] = []

    def load() -> None:
        ctx = proxy.client_ssl_context()
        with httpx.Client(proxy=proxy.url, verify=ctx, trust_env=False, timeout=30) as client:
            while not done.is_set():
                try:
                    r = client.get("https://faulty.test/ok")
                except httpx.HTTPError as exc:
                    failures.append(type(exc).__name__)
                    continue
                answered[0] += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    workers = [threading.Thread(target=load, daemon=True) for _ in range(CLIENTS)]
    for worker in workers:
        worker.start()
    try:
        for i in range(RELOADS):
            before = answered[0]
            proxy.policy_path.write_text(policy(fault, stalled, 51 + i))
            httpx.post(proxy.admin_url + "/policy/reload", trust_env=False, timeout=60).raise_for_status()
            deadline = time.monotonic() + 30  # requests in flight across this reload
            while answered[0] <= before and not failures:
                assert time.monotonic() < deadline, "no request answered after a reload"
                time.sleep(0.005)
    finally:
        done.set()
        for worker in workers:
            worker.join(60)
    assert failures == []
    assert answered[0] >= RELOADS
    assert f'sidekey_policy_reloads_total{{result="ok"}} {float(RELOADS)}' in _metrics(proxy)
    # The retired pools close at the upkeep (each second) after their requests finish; the
    # current one too, once it has held no connection for two upkeeps (none is kept alive here).
    deadline = time.monotonic() + 20
    while (now := pools(proxy))["sessions"] > 1 or now["retiring"]:
        assert time.monotonic() < deadline, f"pools left after {RELOADS} reloads: {pools(proxy)}"
        time.sleep(0.1)
    assert_clean_after(proxy, baseline)


def _metrics(proxy: SidekeyProcess) -> str:
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as answer:
        return str(answer.read().decode())
