"""The periodic heap trim (proxy/memtrim.py): runs every interval off the loop, stops when cancelled."""

from __future__ import annotations

import asyncio
import subprocess
import sys
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


@pytest.mark.parametrize(
    ("env", "limit"),
    [
        ({}, 2),
        ({"SIDEKEY_MALLOC_ARENA_MAX": "4"}, 4),
        ({"SIDEKEY_MALLOC_ARENA_MAX": " 1 "}, 1),
        ({"SIDEKEY_MALLOC_ARENA_MAX": ""}, 2),
        ({"SIDEKEY_MALLOC_ARENA_MAX": "0"}, None),  # glibc's own default
        ({"MALLOC_ARENA_MAX": "3"}, None),  # glibc read it at start: left as it is
        ({"MALLOC_ARENA_MAX": "3", "SIDEKEY_MALLOC_ARENA_MAX": "5"}, None),
    ],
)
def test_arena_limit_from_the_environment(env: dict[str, str], limit: int | None) -> None:
    assert memtrim.arena_limit(env) == limit


@pytest.mark.parametrize("raw", ["two", "-1", "1.5", "2x"])
def test_an_arena_limit_that_is_not_a_whole_number_is_refused(raw: str) -> None:
    with pytest.raises(ValueError) as caught:
        memtrim.arena_limit({"SIDEKEY_MALLOC_ARENA_MAX": raw})
    assert raw not in str(caught.value)


def test_cap_arenas_sets_glibc_arena_max_and_none_leaves_it() -> None:
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 1

    assert memtrim.cap_arenas(2, mallopt=mallopt) is True
    assert memtrim.cap_arenas(None, mallopt=mallopt) is False
    assert calls == [(-8, 2)]  # M_ARENA_MAX from glibc's malloc.h


# Counts glibc's arenas (malloc_info's <heap> elements) after THREADS threads, all alive at once,
# have each allocated a block past pymalloc's 512-byte limit (so from glibc, in that thread).
_ARENAS_AFTER_THREADS = """
import ctypes, os, sys, tempfile, threading
from proxy import memtrim
if sys.argv[1] != "off":
    assert memtrim.cap_arenas(int(sys.argv[1]))
THREADS = 6
barrier = threading.Barrier(THREADS + 1)
held = []
def work():
    held.append(bytearray(4096))
    barrier.wait()
    barrier.wait()
threads = [threading.Thread(target=work) for _ in range(THREADS)]
for t in threads:
    t.start()
barrier.wait()
libc = ctypes.CDLL("libc.so.6")
libc.fopen.restype = ctypes.c_void_p
libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
libc.fclose.argtypes = [ctypes.c_void_p]
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
fd, path = tempfile.mkstemp()
os.close(fd)
fp = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, fp)
libc.fclose(fp)
print(open(path).read().count("<heap nr="))
os.unlink(path)
barrier.wait()
for t in threads:
    t.join()
"""


@pytest.mark.parametrize(("cap", "most"), [("1", 1), ("2", 2)])
def test_capped_threads_share_arenas_in_a_real_process(cap: str, most: int) -> None:
    uncapped = subprocess.run(
        [sys.executable, "-c", _ARENAS_AFTER_THREADS, "off"], capture_output=True, text=True, check=True
    )
    capped = subprocess.run(
        [sys.executable, "-c", _ARENAS_AFTER_THREADS, cap], capture_output=True, text=True, check=True
    )
    assert int(uncapped.stdout) > 2  # glibc's default: an arena per thread (8 per core allowed)
    assert 1 <= int(capped.stdout) <= most
