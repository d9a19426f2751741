"""Count what a sidekey process holds, before and after a fault.

Open file descriptors come from /proc/<pid>/fd; client connections, requests
in flight, asyncio tasks and upstream pool connections from the admin API
(``/metrics`` and ``/providers``). Idle pooled connections are legitimate (keep-alive) and may
come and go, so the fd count is compared net of them: every other fd must be
given back. The same holds for the Redis client's pool (up to 64 connections,
kept for reuse): pass ``pooled_ports`` to count the process's sockets
connected to those ports as pooled, not leaked.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from dataclasses import dataclass

from tests.integration.sidekey_process import SidekeyProcess


@dataclass(frozen=True, slots=True)
class Holdings:
    fds: int
    client_connections: int
    in_flight: int
    upstream_in_use: int
    upstream_idle: int
    pooled_other: int = 0  # sockets to ``pooled_ports`` (a Redis client's pool)
    tasks: int = 0  # asyncio tasks alive (``sidekey_asyncio_tasks``)

    @property
    def fds_net_of_idle(self) -> int:
        return self.fds - self.upstream_idle - self.pooled_other


def _sockets_to(pid: int, ports: frozenset[int]) -> int:
    """The process's TCP sockets whose remote port is one of ``ports``
    (``/proc/<pid>/net/tcp*`` lines matched to its fds by inode)."""
    if not ports:
        return 0
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed while we looked
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as lines:
            next(lines)
            for line in lines:
                fields = line.split()
                if int(fields[2].rsplit(":", 1)[1], 16) in ports and fields[9] in inodes:
                    count += 1
    return count


def _get(proc: SidekeyProcess, path: str) -> str:
    with urllib.request.urlopen(proc.admin_url + path, timeout=10) as answer:
        return str(answer.read().decode())


def _gauge(metrics: str, name: str) -> int:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"{name} missing from /metrics")


def holdings(proc: SidekeyProcess, pooled_ports: frozenset[int] = frozenset()) -> Holdings:
    metrics = _get(proc, "/metrics")
    pools = json.loads(_get(proc, "/providers"))["pools"]["pools"]
    fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
    return Holdings(
        fds=fds,
        client_connections=_gauge(metrics, "sidekey_client_connections"),
        in_flight=_gauge(metrics, "sidekey_requests_in_flight"),
        upstream_in_use=sum(p["in_use"] for p in pools),
        upstream_idle=sum(p["idle"] for p in pools),
        pooled_other=_sockets_to(proc.pid, pooled_ports),
        tasks=_gauge(metrics, "sidekey_asyncio_tasks"),
    )


def assert_back_to(
    proc: SidekeyProcess, baseline: Holdings, *, deadline: float = 20.0, pooled_ports: frozenset[int] = frozenset()
) -> Holdings:
    """Poll until nothing is held beyond ``baseline``; the deadline is generous
    because closes are asynchronous and the machine is loaded."""
    end = time.monotonic() + deadline
    while True:
        now = holdings(proc, pooled_ports)
        settled = (
            now.client_connections == 0
            and now.in_flight == 0
            and now.upstream_in_use == 0
            and now.fds_net_of_idle <= baseline.fds_net_of_idle
            and now.tasks <= baseline.tasks
        )
        if settled:
            return now
        if time.monotonic() > end:
            raise AssertionError(f"leak: {now} vs baseline {baseline}")
        time.sleep(0.1)


def assert_alive(proc: SidekeyProcess) -> None:
    assert proc.proc is not None and proc.proc.poll() is None, "sidekey exited"
    assert _get(proc, "/healthz")
