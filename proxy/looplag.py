"""How late this process's event loop runs, and whether a timed-out Redis call blames Redis.

A sidekey starved of CPU (a loaded node, a noisy neighbour) wakes late from every await, so a
Redis call that Redis answered in 250 us can still overrun its timeout here. That timeout says
nothing about Redis: ``blame`` tells the two apart from the loop's own lag.

``LoopLag.run`` sleeps a fixed interval and records how late it woke: ten wake-ups a second per
process, nothing on the request path. The lag is kept as a maximum that halves every
``half_life`` seconds, so one stall is remembered for a few seconds and then forgotten.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from typing import Literal

INTERVAL = 0.1  # seconds between the monitor's wake-ups
HALF_LIFE = 2.0  # seconds for a recorded lag to halve
LOOP_SHARE = 0.2  # a loop lagging by at least this part of the call's timeout takes the blame

Culprit = Literal["loop", "redis"]


class LoopLag:
    __slots__ = ("interval", "half_life", "clock", "_lag", "_at")

    def __init__(
        self, *, interval: float = INTERVAL, half_life: float = HALF_LIFE, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if interval <= 0 or half_life <= 0:
            raise ValueError("interval and half_life must be positive")
        self.interval = interval
        self.half_life = half_life
        self.clock = clock
        self._lag = 0.0
        self._at = 0.0

    def observe(self, lag: float, now: float) -> None:
        """Record a lag (seconds) seen at ``now``."""
        self._lag = max(self.current(now), lag, 0.0)
        self._at = now

    def current(self, now: float) -> float:
        """The largest recent lag, decayed to ``now`` (seconds)."""
        if self._lag <= 0.0:
            return 0.0
        return self._lag * math.pow(0.5, max(0.0, now - self._at) / self.half_life)

    async def run(self) -> None:
        clock, interval = self.clock, self.interval
        while True:
            start = clock()
            await asyncio.sleep(interval)
            now = clock()
            self.observe(now - start - interval, now)


def blame(reason: str, lag: float, timeout: float) -> Culprit:
    """Who a failed Redis call blames. Only a timeout can be the loop's doing (a refused
    connection is an answer); it is when the loop lagged by at least ``LOOP_SHARE`` of the
    timeout, as a healthy loop lags by a few milliseconds."""
    if reason == "timeout" and lag >= LOOP_SHARE * timeout:
        return "loop"
    return "redis"
