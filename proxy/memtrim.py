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
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import time
from collections.abc import Awaitable, Callable

log = logging.getLogger("sidekey")

DEFAULT_INTERVAL = 60.0


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
