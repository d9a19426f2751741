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

from typing import Literal

from proxy.policy import CircuitPolicy

State = Literal["closed", "open", "half_open"]


BUCKETS = 10  # the window is counted in this many time slices (cheap on every request)


class Breaker:
    __slots__ = ("policy", "state", "consecutive", "opened_until", "probes_in_flight", "opens",
                 "_slice", "_totals", "_failures")  # fmt: skip

    def __init__(self, policy: CircuitPolicy) -> None:
        self.policy = policy
        self.state: State = "closed"
        self.consecutive = 0
        self.opened_until = 0.0
        self.probes_in_flight = 0
        self.opens = 0
        self._slice = 0  # index of the newest time slice
        self._totals = [0] * BUCKETS
        self._failures = [0] * BUCKETS

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

    def available(self, now: float) -> bool:
        """Whether ``allow`` would let a request through (without taking a probe)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return now >= self.opened_until
        return self.probes_in_flight < self.policy.probes

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
        self._count(now, failed)
        if not failed:
            self.consecutive = 0
            return
        self.consecutive += 1
        if self.state != "closed":
            return
        total = sum(self._totals)
        too_often = total >= p.min_requests and sum(self._failures) / total >= p.ratio
        if self.consecutive >= p.failures or too_often:
            self._open(now, retry_after)

    def _count(self, now: float, failed: bool) -> None:
        current = int(now * BUCKETS / self.policy.window)
        if current != self._slice:
            # Clear the slices that fell out of the window since the last event.
            for step in range(1, min(current - self._slice, BUCKETS) + 1):
                slot = (self._slice + step) % BUCKETS
                self._totals[slot] = self._failures[slot] = 0
            self._slice = current
        slot = current % BUCKETS
        self._totals[slot] += 1
        if failed:
            self._failures[slot] += 1

    def _open(self, now: float, retry_after: float | None) -> None:
        self.state = "open"
        self.opens += 1
        self.opened_until = now + max(self.policy.cooldown, retry_after or 0.0)

    def _close(self) -> None:
        self.state, self.consecutive = "closed", 0
        self._totals = [0] * BUCKETS
        self._failures = [0] * BUCKETS

    def statistics(self) -> dict[str, object]:
        return {"state": self.state, "consecutive_failures": self.consecutive, "opens": self.opens}

    def __repr__(self) -> str:
        return f"Breaker({self.state}, consecutive={self.consecutive}, opens={self.opens})"
