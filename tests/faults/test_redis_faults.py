"""Redis killed, paused (SIGSTOP: the port accepts, nothing answers), busy
(``DEBUG SLEEP``: Redis itself blocked), and answering errors (out of memory
under ``maxmemory 1``; NOPERM from an ACL that takes scripts away), under
both ``on_failure`` modes: an error reply means Redis will not count, so it
is decided like an outage (it was a 502 ``addon_failed``).

More requests are sent during the fault, and again after recovery, than the
provider's ``concurrent: 4`` allows at once: a slot leaked on either path
(the local fall-back limiter or the shared one) would turn a later request
into a 429.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import StartProxy, assert_clean_after, curl_status, fault_policy
from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import assert_back_to, holdings
from tests.integration.sidekey_process import SidekeyProcess
from tests.redis_server import RedisServer

CONCURRENT = 4
REQUESTS = CONCURRENT + 2
DEBUG_SLEEP = 20.0  # seconds; the requests during it take about REQUESTS x redis.timeout (1 s)
# Redis 7 refuses a script under OOM only at a first write that may grow memory, and only if
# nothing was written before: a concurrency rule's script starts with ZREMRANGEBYSCORE (a write),
# so Redis goes on counting it over maxmemory. The OOM case is about a rate rule alone.
LIMITS = {"out of memory": "{requests_per_minute: 10000}"}


def kill(server: RedisServer) -> Callable[[], object]:
    server.kill()
    return server.start


def pause(server: RedisServer) -> Callable[[], object]:
    server.pause()
    return server.resume


def busy(server: RedisServer) -> Callable[[], object]:
    """DEBUG SLEEP from a thread (it blocks its caller): Redis itself stops answering, the way
    a long script or a fork on a big dataset stalls it. Long enough for every request sent
    meanwhile (each waits at most ``redis.timeout``); the recovery waits for its end."""
    sleeper = threading.Thread(target=server.debug_sleep, args=(DEBUG_SLEEP,), daemon=True)
    sleeper.start()
    deadline = time.monotonic() + 10
    while server.ping(timeout=0.2):  # asleep once a PING goes unanswered
        assert time.monotonic() < deadline, "DEBUG SLEEP did not take"
    return lambda: sleeper.join(DEBUG_SLEEP + 30)


def out_of_memory(server: RedisServer) -> Callable[[], object]:
    # A script's first write that may grow memory is refused with OOM (Redis 7, no eviction).
    server.command("CONFIG", "SET", "maxmemory", "1")
    return lambda: server.command("CONFIG", "SET", "maxmemory", "0")


def no_permission(server: RedisServer) -> Callable[[], object]:
    server.command("ACL", "SETUSER", "default", "-@scripting")  # the connected clients too, at once
    return lambda: server.command("ACL", "SETUSER", "default", "+@all")


FAULTS: dict[str, Callable[[RedisServer], Callable[[], object]]] = {
    "killed": kill,
    "paused": pause,
    "busy (DEBUG SLEEP)": busy,
    "out of memory": out_of_memory,
    "no permission": no_permission,
}


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    (tmp_path / "redis").mkdir()
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.mark.parametrize("on_failure", ["open", "closed"])
@pytest.mark.parametrize("fault_name", list(FAULTS))
def test_redis_fault_answers_by_failure_mode_and_leaks_no_slot(
    start_proxy: StartProxy,
    fault: FaultUpstream,
    stalled: FaultUpstream,
    redis: RedisServer,
    fault_name: str,
    on_failure: str,
) -> None:
    extra = f"redis: {{url: '{redis.url}', on_failure: {on_failure}, timeout: 1s}}"
    limits = LIMITS.get(fault_name, f"{{concurrent: {CONCURRENT}, requests_per_minute: 10000}}")
    policy = fault_policy(fault, stalled, extra=extra).replace(
        "    circuit: {failures: 0}\n",
        f"    circuit: {{failures: 0}}\n    limits: {limits}\n    queue_wait: 0\n",
        1,
    )
    proxy: SidekeyProcess = start_proxy(policy)
    assert curl_status(proxy, "https://faulty.test/ok")[0] == "200"
    # The Redis client's pool may hold one more connection after an outage (a retry
    # while the loop lags, a reconnect): pooled for reuse, so counted apart, not as a leak.
    redis_port = frozenset({redis.port})
    baseline = assert_back_to(proxy, holdings(proxy, redis_port), pooled_ports=redis_port)
    recover = FAULTS[fault_name](redis)
    try:
        during = [curl_status(proxy, "https://faulty.test/ok") for _ in range(REQUESTS)]
    finally:
        recover()
    if on_failure == "open":
        assert [status for status, _, _ in during] == ["200"] * REQUESTS  # per-process limits serve on
    else:
        assert {(status, json.loads(body)["error"]["code"]) for status, body, _ in during} == {
            ("503", "limits_unavailable")
        }
    deadline = time.monotonic() + 20  # reconnects on its own
    while curl_status(proxy, "https://faulty.test/ok")[0] != "200":
        assert time.monotonic() < deadline, "sidekey did not recover after Redis came back"
        time.sleep(0.2)
    after = [curl_status(proxy, "https://faulty.test/ok")[0] for _ in range(REQUESTS)]
    assert after == ["200"] * REQUESTS  # no slot was lost on the way
    outputs = [body + err for _, body, err in during]
    assert_clean_after(proxy, baseline, *outputs, pooled_ports=redis_port)
    # The outage is logged once, and its end once (not once per request).
    assert proxy.log().count("sidekey.limits: redis unreachable") == 1
    assert proxy.log().count("sidekey.limits: redis reachable again") == 1
