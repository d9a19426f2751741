"""Waiting for a real sidekey without fixed sleeps.

Tests run on machines loaded far beyond their core count (load average 20-50
on 2 cores), where a process may not be scheduled for seconds. So a test waits
for the state it needs (polling with a deadline far above the idle time), and
a timing assertion bounds what the mechanism guarantees, never how fast an idle
machine happens to be.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from tests.integration.conftest import curl
from tests.integration.sidekey_process import SidekeyProcess

DEADLINE = 60.0  # seconds: what a loaded machine may need for a step that takes milliseconds idle


def wait_for(predicate: Callable[[], bool], timeout: float = DEADLINE) -> bool:
    """Poll ``predicate`` every 0.1 s until it holds (True) or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


@dataclass(frozen=True)
class Answer:
    status: int
    body: str


def fetch(proxy: SidekeyProcess, url: str) -> Answer:
    result = curl(proxy, "-s", "-w", "\n%{http_code}", url)
    body, _, status = result.stdout.rpartition("\n")
    return Answer(int(status or 0), body)


def first_after_the_cooldown(
    proxy: SidekeyProcess, url: str, opened_after: float, cooldown: float, timeout: float = DEADLINE
) -> Answer:
    """Poll ``url`` until an answer other than our ``circuit_open`` refusal comes
    (the half-open probe's) and return it. Every earlier answer must be the
    refusal, and the probe cannot come before ``cooldown`` has passed since
    ``opened_after`` (a ``time.monotonic()`` taken before the request that opened
    the circuit: sidekey's breaker reads the same monotonic clock)."""
    deadline = time.monotonic() + max(timeout, cooldown * 2)
    while True:
        answer = fetch(proxy, url)
        if '"circuit_open"' not in answer.body:
            waited = time.monotonic() - opened_after
            assert waited >= cooldown, f"a probe went through {waited:.2f} s after the circuit opened"
            return answer
        assert answer.status == 503, answer
        if time.monotonic() > deadline:
            raise AssertionError(f"still circuit_open {time.monotonic() - opened_after:.1f} s after it opened")
        time.sleep(0.1)
