"""Hand freed heap memory back to the operating system once a minute (glibc).

A proxy allocates and frees many short-lived buffers (TLS records, bodies, parser state)
from several threads (the event loop, the leaf-minting and file-writing workers). glibc
keeps freed chunks in its arenas; when live data sits near the top of an arena the free
space below it is never returned, so RSS creeps up while the bytes in use stay flat. The
60-minute soak (docs/reliability.md) measured exactly that: Python's traced allocations flat
at 14-15 MB, glibc's bytes in use flat, free space inside the heap growing, RSS +6.2% over
the hour; `malloc_trim(0)` once a minute kept RSS flat. `malloc_trim` walks the arenas under
their locks and releases whole free pages (madvise), so it runs in a worker thread, not on
the event loop. Other C libraries (musl) have no `malloc_trim`: then this does nothing.

``SIDEKEY_MALLOC_TRIM_INTERVAL`` (seconds, default 60; 0 turns it off).

glibc also gives each thread that mallocs its own arena (up to 8 per core), and an arena
keeps its heap once made: the soak's probe (bench/soak/probes/arena_probe.py) counted 8
besides the main one (the libuv resolver threads, the to_thread workers), 1.7 MiB held for
work that is a few file writes and DNS lookups. ``cap_arenas`` limits them to
``SIDEKEY_MALLOC_ARENA_MAX`` (default 2: the main arena and one shared by every worker
thread; 0 keeps glibc's default). glibc reads the limit when a thread first needs an arena,
so it runs at start, before any thread. ``MALLOC_ARENA_MAX`` in the environment, read by
glibc itself, wins.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Awaitable, Callable, Mapping

log = logging.getLogger("sidekey")

DEFAULT_INTERVAL = 60.0
DEFAULT_ARENAS = 2
M_ARENA_MAX = -8  # glibc's malloc.h


def arena_limit(env: Mapping[str, str]) -> int | None:
    """How many arenas to allow, or None to leave glibc alone; ValueError if not a whole number."""
    if "MALLOC_ARENA_MAX" in env:
        return None  # glibc has already applied it
    raw = env.get("SIDEKEY_MALLOC_ARENA_MAX", "").strip() or str(DEFAULT_ARENAS)
    if not raw.isdigit():
        raise ValueError("SIDEKEY_MALLOC_ARENA_MAX")
    return int(raw) or None


def libc_mallopt() -> Callable[[int, int], int] | None:
    """glibc's ``mallopt`` as a callable, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return lambda param, value: int(mallopt(param, value))


def cap_arenas(limit: int | None, *, mallopt: Callable[[int, int], int] | None = None) -> bool:
    """Allow at most ``limit`` malloc arenas; True if the C library took it."""
    mallopt = mallopt or libc_mallopt()
    if limit is None or mallopt is None:
        return False
    return mallopt(M_ARENA_MAX, limit) == 1


def libc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a callable, or None where the C library has none."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return lambda: int(trim(0))


async def trim_forever(
    interval: float = DEFAULT_INTERVAL,
    *,
    trim: Callable[[], int] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
) -> None:
    """Every ``interval`` seconds, trim in a worker thread until cancelled."""
    trim = trim or libc_trim()
    if trim is None or interval <= 0:
        return
    while True:
        await sleep(interval)
        started = time.perf_counter()
        released = await asyncio.to_thread(trim)
        log.debug(
            "malloc_trim: %s in %.1f ms", "released" if released else "nothing", 1000 * (time.perf_counter() - started)
        )
