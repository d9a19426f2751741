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

Two allocator settings, made with ``mallopt`` at start before any thread (glibc reads
them when first needed); glibc's own variable in the environment, if set, wins:

- ``SIDEKEY_MALLOC_MMAP_THRESHOLD`` (bytes, default 131072; 0 keeps glibc's sliding default).
  Every TLS connection holds a 256 KiB read buffer (uvloop's, and asyncio's), and every TLS
  read allocates 256 KiB and shrinks it to the record. glibc maps blocks that big on their
  own, but the first one freed raises its threshold above them, after which they all come
  from the heap: the heap then holds ~100 MiB of those buffers at c=64, mostly untouched,
  and as buffers come and go their pages get touched by other data and stay resident, and
  the heap itself grows with fragments (the soak's probe, bench/soak/probes/arena_probe.py:
  bytes in use flat, free inside the heap +0.3 MiB a minute, RSS creeping). A fixed threshold
  (glibc's initial 128 KiB) keeps them mapped on their own, returned whole when freed: the
  heap stayed at 20 MiB with its free space flat, RSS 16 MiB lower, for ~8% more CPU time
  (mmap/munmap per TLS read; same 10-minute soak, side by side).
- ``SIDEKEY_MALLOC_ARENA_MAX`` (default 2; 0 keeps glibc's default of 8 per core): each
  thread that mallocs gets its own arena, kept once made; the probe counted 8 besides the
  main one (the libuv resolver threads, the to_thread workers), 1.7 MiB for a few DNS
  lookups and file writes.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence

log = logging.getLogger("sidekey")

DEFAULT_INTERVAL = 60.0
M_MMAP_THRESHOLD = -3  # glibc's malloc.h
M_ARENA_MAX = -8
# (our variable, glibc's own, mallopt parameter, default)
SETTINGS = (
    ("SIDEKEY_MALLOC_MMAP_THRESHOLD", "MALLOC_MMAP_THRESHOLD_", M_MMAP_THRESHOLD, 128 * 1024),
    ("SIDEKEY_MALLOC_ARENA_MAX", "MALLOC_ARENA_MAX", M_ARENA_MAX, 2),
)


def malloc_options(env: Mapping[str, str]) -> list[tuple[int, int]]:
    """The (mallopt parameter, value) pairs to set. Raises ValueError naming the variable
    (never quoting its value) when one is not a whole number."""
    options = []
    for ours, glibc, param, default in SETTINGS:
        if glibc in env:
            continue  # glibc has already applied it
        raw = env.get(ours, "").strip() or str(default)
        if not raw.isdigit():
            raise ValueError(ours)
        if int(raw):
            options.append((param, int(raw)))
    return options


def trim_interval(env: Mapping[str, str]) -> float:
    """``SIDEKEY_MALLOC_TRIM_INTERVAL`` in seconds (0: off). Raises ValueError naming the
    variable (never quoting its value) when it is not a non-negative number."""
    raw = env.get("SIDEKEY_MALLOC_TRIM_INTERVAL", "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("SIDEKEY_MALLOC_TRIM_INTERVAL") from None
    if not (math.isfinite(value) and value >= 0):
        raise ValueError("SIDEKEY_MALLOC_TRIM_INTERVAL")
    return value


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


def set_malloc_options(options: Sequence[tuple[int, int]], *, mallopt: Callable[[int, int], int] | None = None) -> int:
    """Apply them; how many the C library took (glibc's mallopt answers 1 when it does)."""
    mallopt = mallopt or libc_mallopt()
    if mallopt is None:
        return 0
    return sum(mallopt(param, value) == 1 for param, value in options)


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
