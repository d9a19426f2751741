"""The loop-lag monitor and the blame decision: an injected clock, no sleeps but the monitor's own."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.looplag import HALF_LIFE, LOOP_SHARE, LoopLag, blame


class Clock:
    def __init__(self) -> None:
        self.now = 500.0

    def __call__(self) -> float:
        return self.now


def test_the_largest_lag_is_kept_and_halves_every_half_life() -> None:
    clock = Clock()
    lag = LoopLag(clock=clock)
    assert lag.current(clock.now) == 0.0
    lag.observe(0.4, clock.now)
    lag.observe(0.1, clock.now)  # smaller: the maximum stays
    assert lag.current(clock.now) == pytest.approx(0.4)
    clock.now += HALF_LIFE
    assert lag.current(clock.now) == pytest.approx(0.2)
    lag.observe(0.05, clock.now)  # the decayed maximum is still larger
    clock.now += HALF_LIFE
    assert lag.current(clock.now) == pytest.approx(0.1)
    lag.observe(0.3, clock.now)  # a new stall replaces a faded one
    assert lag.current(clock.now) == pytest.approx(0.3)
    lag.observe(-0.001, clock.now)  # a sleep that woke early (clock granularity) is no lag
    assert lag.current(clock.now) == pytest.approx(0.3)
    with pytest.raises(ValueError):
        LoopLag(interval=0)


@pytest.mark.parametrize(
    ("reason", "lag", "timeout", "culprit"),
    [
        ("timeout", 0.0, 0.5, "redis"),  # a quiet loop: Redis did not answer
        ("timeout", 0.099, 0.5, "redis"),  # just under a fifth of the budget
        ("timeout", LOOP_SHARE * 0.5, 0.5, "loop"),  # a fifth of it: this process was late, not Redis
        ("timeout", 2.0, 0.5, "loop"),
        ("connection refused", 2.0, 0.5, "redis"),  # an answer, however late the loop
        ("connection error", 2.0, 0.5, "redis"),
        ("read-only replica", 2.0, 0.5, "redis"),
        ("timeout", 0.3, 2.0, "redis"),  # the same lag is small against a longer timeout
    ],
)
def test_blame(reason: str, lag: float, timeout: float, culprit: str) -> None:
    assert blame(reason, lag, timeout) == culprit


@pytest.mark.asyncio
async def test_the_monitor_measures_a_blocked_loop() -> None:
    lag = LoopLag(interval=0.01)
    task = asyncio.create_task(lag.run())
    try:
        await asyncio.sleep(0.05)  # the monitor is asleep in its interval
        time.sleep(0.3)  # noqa: ASYNC251 - the point: block the loop, as a starved or busy process would
        deadline = time.monotonic() + 10
        while lag.current(time.monotonic()) < 0.2:  # woke >= 290 ms late; decay over ~0 s is nil
            assert time.monotonic() < deadline, lag.current(time.monotonic())
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
