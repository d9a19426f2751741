"""The audit log's and the DLQ's disk full (a 256 KiB tmpfs, filled by another file).

Requests keep flowing with their usual answers; each lost audit line and
dead-letter entry is counted (``sidekey_audit_lines_lost_total``,
``sidekey_dlq_entries_lost_total``); the failure is logged once per sink, and
once more when space is back; nothing half written is left in the files
(every line parses), and the records after the recovery are written.
Needs to mount a tmpfs (root with CAP_SYS_ADMIN, as CI runs).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.faults.conftest import assert_clean_after, curl_status, fault_policy
from tests.faults.fault_upstream import FaultUpstream
from tests.faults.leaks import assert_back_to, holdings
from tests.integration.conftest import SECRET_ENV
from tests.integration.sidekey_process import SidekeyProcess

MAX_ROUNDS = 40  # requests of each kind while the disk is full, at most


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(disk: Path) -> Path:
    """A file taking every free block: the next write of anyone else gets ENOSPC."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def counter(proxy: SidekeyProcess, name: str) -> float:
    with urllib.request.urlopen(proxy.admin_url + "/metrics", timeout=10) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"{name} missing")


def wait_until(check: object, what: str) -> None:
    deadline = time.monotonic() + 30
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def requests(proxy: SidekeyProcess, outputs: list[str]) -> None:
    """One answered request (an audit line) and one dead letter (an upstream reset)."""
    status, body, err = curl_status(proxy, "https://faulty.test/ok")
    assert status == "200", err
    status, body2, err2 = curl_status(proxy, "https://faulty.test/rst/headers", "-d", "{}")
    assert status == "502" and json.loads(body2)["error"]["code"] == "upstream_disconnected"
    outputs += [body + err, body2 + err2]


def test_a_full_disk_loses_records_counted_and_logged_once_and_requests_flow(
    tmp_path: Path, disk: Path, fault: FaultUpstream, stalled: FaultUpstream
) -> None:
    audit, dlq = disk / "audit.jsonl", disk / "dlq.jsonl"
    (tmp_path / "sidekey").mkdir()
    proxy = SidekeyProcess(tmp_path / "sidekey", fault_policy(fault, stalled), env=SECRET_ENV,
                           args=("--audit", str(audit), "--dlq", str(dlq)))  # fmt: skip
    outputs: list[str] = []
    try:
        proxy.start()
        requests(proxy, outputs)
        wait_until(lambda: audit.read_text().count("\n") >= 2 and dlq.exists() and dlq.read_text(), "records written")
        baseline = assert_back_to(proxy, holdings(proxy))

        filler = fill(disk)
        rounds = 1
        # A file's last page may still take a line or two: keep going until both sinks lose one.
        lost = ("sidekey_audit_lines_lost_total", "sidekey_dlq_entries_lost_total")
        while not all(counter(proxy, name) for name in lost):
            assert rounds <= MAX_ROUNDS, "nothing was lost on a full disk"
            requests(proxy, outputs)
            rounds += 1
            time.sleep(0.3)  # a flush interval (audit 0.25 s): the batches stay small
        log = proxy.log()
        assert log.count("audit lines write failed (ENOSPC: No space left on device)") == 1
        assert log.count("dead-letter entries write failed (ENOSPC: No space left on device)") == 1

        filler.unlink()
        requests(proxy, outputs)
        rounds += 1
        wait_until(lambda: "audit lines writes work again;" in proxy.log(), "audit recovery logged")
        wait_until(lambda: "dead-letter entries writes work again;" in proxy.log(), "dlq recovery logged")
        # Every record is in its file or counted lost: none half written, none lost silently.
        wait_until(lambda: len(audit.read_text().splitlines()) + counter(proxy, lost[0]) == 2 * rounds, "audit sum")
        wait_until(lambda: len(dlq.read_text().splitlines()) + counter(proxy, lost[1]) == rounds, "dlq sum")
        assert all(json.loads(line) for line in audit.read_text().splitlines() + dlq.read_text().splitlines())
        assert dlq.read_text().splitlines()[-1].startswith('{"id"')  # the one after the recovery is there
        log = proxy.log()
        assert log.count("write failed") == 2 and log.count("writes work again;") == 2
        assert_clean_after(proxy, baseline, *outputs)
    finally:
        proxy.stop()
