"""Diagnostic addon for the soak: Python allocations by line, every minute,
compared with a snapshot taken 2 minutes in, to $SOAK_TRACEMALLOC_OUT.

    SOAK_SIDEKEY_ARGS="--addon bench/soak/probes/tracemalloc_probe.py" bench/soak.sh 10m --concurrency 16

tracemalloc slows sidekey several times and adds its own memory: read the
traced total and the sites, not RSS or throughput. Never load it in production.
"""

from __future__ import annotations

import os
import threading
import time
import tracemalloc

OUT = os.environ.get("SOAK_TRACEMALLOC_OUT", "/tmp/soak-tracemalloc-probe.txt")
tracemalloc.start(12)


def _run() -> None:
    time.sleep(120)
    base = tracemalloc.take_snapshot()
    minute = 0
    while True:
        time.sleep(60)
        minute += 1
        snapshot = tracemalloc.take_snapshot()
        traced, _ = tracemalloc.get_traced_memory()
        with open(OUT, "a") as out:
            out.write(f"\n=== {time.strftime('%H:%M:%S')} minute {minute}: traced {traced / 1e6:.1f} MB\n")
            for stat in snapshot.compare_to(base, "lineno")[:15]:
                out.write(f"{stat}\n")


threading.Thread(target=_run, name="soak-tracemalloc-probe", daemon=True).start()


class TracemallocProbe:
    name = "soak_tracemalloc_probe"


addons = [TracemallocProbe()]
