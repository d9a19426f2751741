"""Diagnostic addon for the soak: every minute, glibc's heap as mallinfo2 sees it
(bytes in use vs free inside the heap) and RSS, one line to $SOAK_MALLOC_OUT.
With SOAK_MALLOC_TRIM=1 it then calls malloc_trim(0) and logs RSS again.

    SOAK_SIDEKEY_ARGS="--addon bench/soak/probes/malloc_probe.py" bench/soak.sh 20m

In use flat while RSS creeps: free space in the heap (fragmentation), not memory held.
glibc only (Debian's); never load it in production.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time

OUT = os.environ.get("SOAK_MALLOC_OUT", "/tmp/soak-malloc-probe.txt")
TRIM = os.environ.get("SOAK_MALLOC_TRIM") == "1"
FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = MallInfo2


def _rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _run() -> None:
    while True:
        time.sleep(60)
        info = _libc.mallinfo2()
        before = _rss_kib()
        line = (
            f"{time.strftime('%H:%M:%S')} rss {before} KiB; heap {info.arena >> 10} KiB, "
            f"in use {info.uordblks >> 10} KiB, free {info.fordblks >> 10} KiB, mmapped {info.hblkhd >> 10} KiB"
        )
        if TRIM:
            _libc.malloc_trim(0)
            line += f"; after malloc_trim rss {_rss_kib()} KiB"
        with open(OUT, "a") as out:
            out.write(line + "\n")


threading.Thread(target=_run, name="soak-malloc-probe", daemon=True).start()


class MallocProbe:
    name = "soak_malloc_probe"


addons = [MallocProbe()]
