"""The periodic heap trim (proxy/memtrim.py): runs every interval off the loop, stops when cancelled."""

from __future__ import annotations

import asyncio
import threading

import pytest

from proxy import memtrim


def test_glibc_trim_is_found_and_callable_here() -> None:
    trim = memtrim.libc_trim()
    assert trim is not None  # this machine (and the image) use glibc
    assert trim() in (0, 1)


@pytest.mark.asyncio
async def test_trims_once_per_interval_in_a_worker_thread() -> None:
    calls: list[str] = []
    slept: list[float] = []
    third = asyncio.Event()

    def trim() -> int:
        calls.append(threading.current_thread().name)
        return 1

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        if len(slept) > 3:
            third.set()
            await asyncio.Event().wait()  # park until cancelled

    task = asyncio.create_task(memtrim.trim_forever(60.0, trim=trim, sleep=sleep))
    await third.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert slept == [60.0, 60.0, 60.0, 60.0]
    assert len(calls) == 3
    assert all(name != threading.main_thread().name for name in calls)  # never on the event loop


@pytest.mark.asyncio
async def test_an_interval_of_zero_turns_it_off() -> None:
    calls: list[int] = []

    def trim() -> int:
        calls.append(1)
        return 1

    await asyncio.wait_for(memtrim.trim_forever(0, trim=trim), timeout=5)
    assert calls == []
