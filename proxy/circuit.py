"""Circuit breaker per upstream. Pure: every call takes ``now``.

    closed ──(N consecutive failures, or failure ratio over the window with
              at least min_requests)──> open
    open ──(cooldown elapsed; Retry-After from the upstream when longer)──> half_open
    half_open ──(a probe succeeds)──> closed
    half_open ──(a probe fails)──> open (a fresh cooldown)

While open, requests are refused at once (503 circuit_open with Retry-After)
instead of waiting on an upstream known to be down. In half_open only
``probes`` requests are let through at a time.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from proxy.policy import CircuitPolicy

State = Literal["closed", "open", "half_open"]


class Breaker:
    __slots__ = ("policy", "state", "consecutive", "opened_until", "probes_in_flight", "_events", "_failed", "opens")

    def __init__(self, policy: CircuitPolicy) -> None:
        self.policy = policy
        self.state: State = "closed"
        self.consecutive = 0
        self.opened_until = 0.0
        self.probes_in_flight = 0
        self._events: deque[tuple[float, bool]] = deque()  # (time, failed) within the window
        self._failed = 0
        self.opens = 0

    def allow(self, now: float) -> bool:
        if self.state == "closed":
            return True
        if self.state == "open":
            if now < self.opened_until:
                return False
            self.state, self.probes_in_flight = "half_open", 0
        if self.probes_in_flight >= self.policy.probes:
            return False
        self.probes_in_flight += 1
        return True

    def retry_after(self, now: float) -> float:
        return max(0.0, self.opened_until - now)

    def abandon(self) -> None:
        """An allowed request ended without an outcome (the client left)."""
        if self.state == "half_open":
            self.probes_in_flight = max(0, self.probes_in_flight - 1)

    def record(self, failed: bool, now: float, retry_after: float | None = None) -> None:
        p = self.policy
        if not p.failures:
            return  # breaker disabled
        if self.state == "half_open":
            self.probes_in_flight = max(0, self.probes_in_flight - 1)
            if failed:
                self._open(now, retry_after)
            else:
                self._close()
            return
        self._events.append((now, failed))
        self._failed += failed
        while self._events and self._events[0][0] < now - p.window:
            _t, was_failed = self._events.popleft()
            self._failed -= was_failed
        self.consecutive = self.consecutive + 1 if failed else 0
        if self.state != "closed" or not failed:
            return
        too_many = p.failures and self.consecutive >= p.failures
        total = len(self._events)
        too_often = total >= p.min_requests and self._failed / total >= p.ratio
        if too_many or too_often:
            self._open(now, retry_after)

    def _open(self, now: float, retry_after: float | None) -> None:
        self.state = "open"
        self.opens += 1
        self.opened_until = now + max(self.policy.cooldown, retry_after or 0.0)

    def _close(self) -> None:
        self.state, self.consecutive, self._failed = "closed", 0, 0
        self._events.clear()

    def statistics(self) -> dict[str, object]:
        return {"state": self.state, "consecutive_failures": self.consecutive, "opens": self.opens}

    def __repr__(self) -> str:
        return f"Breaker({self.state}, consecutive={self.consecutive}, opens={self.opens})"
