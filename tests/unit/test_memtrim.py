"""The periodic heap trim (proxy/memtrim.py): runs every interval off the loop, stops when cancelled."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from pathlib import Path

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


MMAP, ARENAS = -3, -8  # M_MMAP_THRESHOLD, M_ARENA_MAX in glibc's malloc.h


@pytest.mark.parametrize(
    ("env", "options"),
    [
        ({}, [(MMAP, 131072), (ARENAS, 2)]),
        ({"SIDEKEY_MALLOC_ARENA_MAX": "4"}, [(MMAP, 131072), (ARENAS, 4)]),
        ({"SIDEKEY_MALLOC_ARENA_MAX": " 1 ", "SIDEKEY_MALLOC_MMAP_THRESHOLD": "65536"}, [(MMAP, 65536), (ARENAS, 1)]),
        ({"SIDEKEY_MALLOC_ARENA_MAX": ""}, [(MMAP, 131072), (ARENAS, 2)]),
        ({"SIDEKEY_MALLOC_ARENA_MAX": "0", "SIDEKEY_MALLOC_MMAP_THRESHOLD": "0"}, []),  # glibc's own defaults
        ({"MALLOC_ARENA_MAX": "3"}, [(MMAP, 131072)]),  # glibc read its own at start: left as it is
        ({"MALLOC_ARENA_MAX": "3", "SIDEKEY_MALLOC_ARENA_MAX": "5", "MALLOC_MMAP_THRESHOLD_": "1"}, []),
    ],
)
def test_malloc_options_from_the_environment(env: dict[str, str], options: list[tuple[int, int]]) -> None:
    assert memtrim.malloc_options(env) == options


@pytest.mark.parametrize("name", ["SIDEKEY_MALLOC_ARENA_MAX", "SIDEKEY_MALLOC_MMAP_THRESHOLD"])
@pytest.mark.parametrize("raw", ["two", "-1", "1.5", "2x"])
def test_a_malloc_option_that_is_not_a_whole_number_is_refused_by_name(name: str, raw: str) -> None:
    with pytest.raises(ValueError) as caught:
        memtrim.malloc_options({name: raw})
    assert str(caught.value) == name  # the variable, never its value


@pytest.mark.parametrize(("raw", "seconds"), [(None, 60.0), ("", 60.0), ("0", 0.0), (" 2.5 ", 2.5), ("300", 300.0)])
def test_trim_interval_from_the_environment(raw: str | None, seconds: float) -> None:
    env = {} if raw is None else {"SIDEKEY_MALLOC_TRIM_INTERVAL": raw}
    assert memtrim.trim_interval(env) == seconds


@pytest.mark.parametrize("raw", ["soon", "-1", "nan", "inf", "1e999"])
def test_a_trim_interval_that_is_not_a_non_negative_number_is_refused_by_name(raw: str) -> None:
    with pytest.raises(ValueError) as caught:
        memtrim.trim_interval({"SIDEKEY_MALLOC_TRIM_INTERVAL": raw})
    assert str(caught.value) == "SIDEKEY_MALLOC_TRIM_INTERVAL"  # the variable, never its value


def test_set_malloc_options_calls_mallopt_and_counts_what_it_took() -> None:
    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:
        calls.append((param, value))
        return 0 if param == MMAP else 1

    assert memtrim.set_malloc_options([(MMAP, 131072), (ARENAS, 2)], mallopt=mallopt) == 1
    assert calls == [(MMAP, 131072), (ARENAS, 2)]


# Real glibc, in a fresh process: the settings applied by memtrim from $SIDEKEY_MALLOC_*, then
# (arenas) THREADS threads, all alive at once, each allocate a block past pymalloc's 512-byte
# limit (so glibc's, in that thread) and malloc_info's <heap> elements are counted; (mmap) a
# 1 MiB block is made and freed (glibc's sliding threshold rises above it), then a 300 KiB one
# is held and mallinfo2 says whether it was mapped on its own (hblks).
_MALLOC_IN_A_PROCESS = """
import ctypes, os, sys, tempfile, threading
from proxy import memtrim
memtrim.set_malloc_options(memtrim.malloc_options(os.environ))
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
if sys.argv[1] == "mmap":
    big = bytearray(1 << 20)
    del big
    before = libc.mallinfo2().hblks
    held = bytearray(300 * 1024)
    print(libc.mallinfo2().hblks - before)
    sys.exit(0)
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


def _in_a_process(what: str, **env: str) -> int:
    clean = {k: v for k, v in os.environ.items() if "MALLOC_" not in k}
    done = subprocess.run(
        [sys.executable, "-c", _MALLOC_IN_A_PROCESS, what],
        env={**clean, **env},
        capture_output=True,
        text=True,
        check=True,
    )
    return int(done.stdout)


@pytest.mark.parametrize(("cap", "most"), [("1", 1), ("2", 2)])
def test_capped_threads_share_arenas_in_a_real_process(cap: str, most: int) -> None:
    assert _in_a_process("arenas", SIDEKEY_MALLOC_ARENA_MAX="0") > 2  # glibc's default: an arena per thread
    assert 1 <= _in_a_process("arenas", SIDEKEY_MALLOC_ARENA_MAX=cap) <= most


def test_a_fixed_mmap_threshold_keeps_big_blocks_off_the_heap_in_a_real_process() -> None:
    assert _in_a_process("mmap", SIDEKEY_MALLOC_MMAP_THRESHOLD="0") == 0  # glibc's sliding threshold: from the heap
    assert _in_a_process("mmap") == 1  # the default 128 KiB, fixed: mapped on its own


def test_sidekey_run_refuses_a_bad_setting_naming_the_variable_not_the_value(tmp_path: Path) -> None:
    env = {**os.environ, "SIDEKEY_MALLOC_MMAP_THRESHOLD": "lots-of-secret-bytes"}
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--policies", str(tmp_path / "none.yaml"), "--listen", "127.0.0.1:0"],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode != 0
    assert "$SIDEKEY_MALLOC_MMAP_THRESHOLD" in done.stderr
    assert "lots-of-secret-bytes" not in done.stderr + done.stdout
