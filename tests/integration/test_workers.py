"""sidekey run --workers N: N processes on one port, per-worker admin, signals (#17 item 5)."""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import SECRET_ENV, policy_for
from tests.integration.polling import wait_for
from tests.integration.sidekey_process import REPO, SidekeyProcess
from tests.redis_server import RedisServer

StartSidekey = Callable[..., SidekeyProcess]
_ADMIN = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")
_WORKER = re.compile(r"worker (\d+), pid (\d+)")


def _workers_up(proc: SidekeyProcess, n: int) -> tuple[list[int], list[int]]:
    """Every worker's admin port and pid, once each has logged both (polled)."""
    assert wait_for(lambda: len(set(_ADMIN.findall(proc.log()))) >= n and len(_WORKER.findall(proc.log())) >= n)
    log = proc.log()
    return sorted({int(p) for p in _ADMIN.findall(log)}), [int(pid) for _i, pid in _WORKER.findall(log)]


def _requests_served(admin_port: int) -> float:
    text = httpx.get(f"http://127.0.0.1:{admin_port}/metrics", timeout=30).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "sidekey_requests_total"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def test_two_workers_share_one_port_and_each_serves(start_sidekey: StartSidekey, fake: FakeProviderThread) -> None:
    proc = start_sidekey(policy_for(fake), args=("--workers", "2"))
    admin_ports, pids = _workers_up(proc, 2)
    assert len(admin_ports) == 2 and len(set(pids)) == 2 and proc.pid not in pids
    ctx = ssl.create_default_context(cafile=str(proc.ca_path))
    for _ in range(24):  # a new connection each: the kernel spreads them over the workers
        with httpx.Client(proxy=proc.url, verify=ctx, timeout=60) as client:
            r = client.get("https://api.openai.com/v1/models", headers={"Authorization": "Bearer placeholder"})
            assert r.status_code == 200
    served = [_requests_served(port) for port in admin_ports]
    assert sum(served) == 24
    assert all(n > 0 for n in served), served  # all 24 on one worker: p = 2 * 2**-24


def test_sigterm_to_the_supervisor_stops_every_worker(start_sidekey: StartSidekey, fake: FakeProviderThread) -> None:
    proc = start_sidekey(policy_for(fake), args=("--workers", "2"))
    _ports, pids = _workers_up(proc, 2)
    assert proc.terminate(wait=60) == 0
    assert wait_for(lambda: not any(_alive(pid) for pid in pids))


def test_a_worker_that_dies_stops_the_set(start_sidekey: StartSidekey, fake: FakeProviderThread) -> None:
    proc = start_sidekey(policy_for(fake), args=("--workers", "2"))
    _ports, pids = _workers_up(proc, 2)
    os.kill(pids[0], signal.SIGKILL)
    assert proc.proc is not None
    assert proc.proc.wait(60) == 1
    assert wait_for(lambda: not _alive(pids[1]))
    assert re.search(rf"worker pid {pids[0]} exited with -9; stopping the others", proc.log())


def test_local_only_limits_refuse_more_than_one_worker(tmp_path: Path, fake: FakeProviderThread) -> None:
    policy = policy_for(fake).replace(
        "    retry: {attempts: 1}  # failure tests",
        "    limits: {requests_per_minute: 60}\n    retry: {attempts: 1}  #",
        1,
    )
    (tmp_path / "policies.yaml").write_text(policy)
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "run", "--workers", "2", "--policies", str(tmp_path / "policies.yaml"),
         "--certs", str(tmp_path / "certs"), "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"],
        cwd=REPO, env={**os.environ, **SECRET_ENV}, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert out.returncode == 2
    assert "--workers 2: providers.openai: limits would be counted once per worker" in out.stderr
    assert "redis:" in out.stderr and "--workers 1" in out.stderr
    assert not (tmp_path / "certs").exists() or "listening" not in out.stderr


def test_two_workers_share_one_limit_through_redis(
    start_sidekey: StartSidekey, fake: FakeProviderThread, tmp_path: Path
) -> None:
    """With ``redis:``, a limit is one quota for every worker, as for every sidecar: 3x the
    limit over new connections (spread over both workers by the kernel) admits exactly the
    limit. A minute's window at 10 a minute refills one request per 6 s, so the count holds
    unless the 30 requests take longer than that (the bound names the run's duration)."""
    limit = 10
    with RedisServer(tmp_path) as redis:
        policy = policy_for(fake, limits=f"redis: {{url: '{redis.url}', on_failure: closed, timeout: 5s}}").replace(
            "    retry: {attempts: 1}  # failure tests",
            f"    limits: {{requests_per_minute: {limit}}}\n    queue_wait: 0\n    retry: {{attempts: 1}}  #",
            1,
        )
        proc = start_sidekey(policy, args=("--workers", "2"))
        admin_ports, _pids = _workers_up(proc, 2)
        ctx = ssl.create_default_context(cafile=str(proc.ca_path))
        statuses = []
        started = time.monotonic()
        for _ in range(3 * limit):
            with httpx.Client(proxy=proc.url, verify=ctx, timeout=60) as client:
                r = client.get("https://api.openai.com/v1/models", headers={"Authorization": "Bearer placeholder"})
                statuses.append(r.status_code)
        took = time.monotonic() - started
        refilled = int(took // (60 / limit))  # requests the window gave back while the test ran
        assert statuses.count(429) + statuses.count(200) == 3 * limit, statuses
        assert limit <= statuses.count(200) <= limit + refilled, (statuses, took)
        served = [_requests_served(port) for port in admin_ports]
        assert all(n > 0 for n in served), served  # both workers answered: the quota was shared
