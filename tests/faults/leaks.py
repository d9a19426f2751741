"""Count what a sidekey process holds, before and after a fault.

Open file descriptors come from /proc/<pid>/fd; client connections, requests
in flight and upstream pool connections from the admin API (``/metrics`` and
``/providers``). Idle pooled connections are legitimate (keep-alive) and may
come and go, so the fd count is compared net of them: every other fd must be
given back.
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

    @property
    def fds_net_of_idle(self) -> int:
        return self.fds - self.upstream_idle


def _get(proc: SidekeyProcess, path: str) -> str:
    with urllib.request.urlopen(proc.admin_url + path, timeout=10) as answer:
        return str(answer.read().decode())


def _gauge(metrics: str, name: str) -> int:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"{name} missing from /metrics")


def holdings(proc: SidekeyProcess) -> Holdings:
    metrics = _get(proc, "/metrics")
    pools = json.loads(_get(proc, "/providers"))["pools"]["pools"]
    fds = len(os.listdir(f"/proc/{proc.pid}/fd"))
    return Holdings(
        fds=fds,
        client_connections=_gauge(metrics, "sidekey_client_connections"),
        in_flight=_gauge(metrics, "sidekey_requests_in_flight"),
        upstream_in_use=sum(p["in_use"] for p in pools),
        upstream_idle=sum(p["idle"] for p in pools),
    )


def assert_back_to(proc: SidekeyProcess, baseline: Holdings, *, deadline: float = 20.0) -> Holdings:
    """Poll until nothing is held beyond ``baseline``; the deadline is generous
    because closes are asynchronous and the machine is loaded."""
    end = time.monotonic() + deadline
    while True:
        now = holdings(proc)
        settled = (
            now.client_connections == 0
            and now.in_flight == 0
            and now.upstream_in_use == 0
            and now.fds_net_of_idle <= baseline.fds_net_of_idle
        )
        if settled:
            return now
        if time.monotonic() > end:
            raise AssertionError(f"leak: {now} vs baseline {baseline}")
        time.sleep(0.1)


def assert_alive(proc: SidekeyProcess) -> None:
    assert proc.proc is not None and proc.proc.poll() is None, "sidekey exited"
    assert _get(proc, "/healthz")
