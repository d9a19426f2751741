"""Diagnostic addon for the soak: every minute, where the resident memory is, one JSON
line to $SOAK_ARENA_OUT (default /tmp/soak-arena-probe.jsonl):

- rss and its split from /proc/self/smaps: brk heap (glibc's main arena), anonymous
  mappings (other glibc arenas, Python's obmalloc arenas, thread stacks, big mmapped
  chunks), file-backed; and the 12 anonymous mappings with the most resident memory
  (start address, size, rss) so a growing one can be followed from line to line;
- glibc per arena (malloc_info's XML): system size, bytes free inside, mmapped;
- glibc summed over arenas (mallinfo2): bytes in use, free inside, top chunk;
- Python's allocated blocks (sys.getallocatedblocks: a leak of Python objects shows there);
- the threads (names from /proc/self/task), since each thread that mallocs may get an arena.

    SOAK_SIDEKEY_ARGS="--addon bench/soak/probes/arena_probe.py" bench/soak.sh 15m

glibc only (Debian's); never load it in production.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import sys
import tempfile
import threading
import time

OUT = os.environ.get("SOAK_ARENA_OUT", "/tmp/soak-arena-probe.jsonl")
_libc = ctypes.CDLL("libc.so.6")
_libc.fopen.restype = ctypes.c_void_p
_libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
_libc.fclose.argtypes = [ctypes.c_void_p]
_libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
HEAP = re.compile(r'<heap nr="(\d+)">(.*?)</heap>', re.S)


def smaps() -> dict[str, object]:
    groups = {"heap": 0, "anon": 0, "file": 0, "other": 0}
    anon: list[tuple[int, str, int]] = []
    name, start, size = "", "", 0
    with open("/proc/self/smaps") as maps:
        for line in maps:
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                lo, hi = head[0].split("-")
                start, size = lo, (int(hi, 16) - int(lo, 16)) >> 10
                name = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                rss = int(head[1])
                if name == "[heap]":
                    groups["heap"] += rss
                elif name == "":
                    groups["anon"] += rss
                    anon.append((rss, start, size))
                elif name.startswith("/"):
                    groups["file"] += rss
                else:
                    groups["other"] += rss
    anon.sort(reverse=True)
    return {**groups, "top_anon": [[s, k, r] for r, s, k in anon[:12]], "anon_maps": len(anon)}


def arenas() -> list[dict[str, int]]:
    fd, path = tempfile.mkstemp(prefix="soak-malloc-info-")
    os.close(fd)
    fp = _libc.fopen(path.encode(), b"w")
    _libc.malloc_info(0, fp)
    _libc.fclose(fp)
    with open(path) as f:
        xml = f.read()
    os.unlink(path)
    out = []
    for nr, body in HEAP.findall(xml):
        current = re.search(r'<system type="current" size="(\d+)"', body)
        rest = re.search(r'<total type="rest" count="(\d+)" size="(\d+)"', body)
        mmap = re.search(r'<total type="mmap" count="(\d+)" size="(\d+)"', body)
        out.append(
            {
                "nr": int(nr),
                "system_kib": int(current.group(1)) >> 10 if current else -1,
                "free_kib": int(rest.group(2)) >> 10 if rest else -1,
                "free_chunks": int(rest.group(1)) if rest else -1,
                "mmap_kib": int(mmap.group(2)) >> 10 if mmap else 0,
            }
        )
    return out


FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS]


_libc.mallinfo2.restype = MallInfo2


def mallinfo() -> dict[str, int]:
    """All arenas summed: bytes in use, free inside, and the top chunk (keepcost)."""
    info = _libc.mallinfo2()
    return {"in_use_kib": info.uordblks >> 10, "free_kib": info.fordblks >> 10, "top_kib": info.keepcost >> 10}


def threads() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as comm:
                names.append(comm.read().strip())
        except OSError:
            pass
    return sorted(names)


def _run() -> None:
    started = time.monotonic()
    while True:
        time.sleep(60)
        line = {
            "t_min": round((time.monotonic() - started) / 60, 1),
            "smaps": smaps(),
            "arenas": arenas(),
            "mallinfo": mallinfo(),
            "pymalloc_blocks": sys.getallocatedblocks(),
            "threads": threads(),
            "py_threads": sorted(t.name for t in threading.enumerate()),
        }
        with open(OUT, "a") as out:
            out.write(json.dumps(line) + "\n")


threading.Thread(target=_run, name="soak-arena-probe", daemon=True).start()


class ArenaProbe:
    name = "soak_arena_probe"


addons = [ArenaProbe()]
