"""A full disk under the audit log and the DLQ: a batch is appended whole or cut
back (no torn line, nothing buffered to surface later), the loss is counted, and
said once per outage (``addons.record_sink``). The real disk case is
``tests/faults/test_disk_faults.py`` (a full tmpfs)."""

from __future__ import annotations

import errno
import json
import logging
import os
from pathlib import Path

import pytest

from addons.record_sink import FileSink, Losses, WriteFailed, check_sizes


def test_a_write_cut_short_by_a_full_disk_is_cut_back_and_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = FileSink(str(path), 0, 0)
    sink.write(['{"n":1}'])
    real_write = os.write

    def disk_fills(fd: int, data: memoryview) -> int:  # half of it fits, then ENOSPC
        if len(data) > 4:
            return real_write(fd, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", disk_fills)
    with pytest.raises(WriteFailed) as failed:
        sink.write(['{"n":2}', '{"n":3}'])
    assert failed.value.lost == 2 and failed.value.reason == "ENOSPC: No space left on device"
    assert path.read_text() == '{"n":1}\n'  # the half line was cut back
    monkeypatch.setattr(os, "write", real_write)
    sink.write(['{"n":4}'])
    sink.close()
    assert [json.loads(line)["n"] for line in path.read_text().splitlines()] == [1, 4]


def test_losses_are_said_once_per_outage_and_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    losses = Losses("audit lines", "sidekey_audit_lines_lost_total", logging.getLogger("t"), clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t"):
        for _ in range(3):
            losses.failed(2, "ENOSPC: No space left on device")
        losses.succeeded()
        now[0] = 10.0  # a nearly full disk takes one batch, refuses the next: counted only
        losses.failed(1, "ENOSPC: No space left on device")
        losses.succeeded()
        now[0] = 100.0  # a new outage, a minute on
        losses.failed(1, "ENOSPC: No space left on device")
    said = [r.getMessage() for r in caplog.records]
    assert losses.total == 8
    assert said == [
        "audit lines write failed (ENOSPC: No space left on device): audit lines are lost until writes work "
        "again, counted in sidekey_audit_lines_lost_total",
        "audit lines writes work again; 6 lost meanwhile",
        "audit lines write failed (ENOSPC: No space left on device): audit lines are lost until writes work "
        "again, counted in sidekey_audit_lines_lost_total",
    ]


@pytest.mark.parametrize(
    ("sizes", "message"),
    [
        ({"max_bytes": 10, "backups": 1, "max_body_log": 0}, None),
        ({"max_bytes": 0, "backups": 0, "max_body_log": 0}, None),  # no rotation: no backup needed
        (
            {"max_bytes": -1, "backups": 1, "max_body_log": 0},
            "audit: max_bytes, backups and max_body_log must not be negative",
        ),
        ({"max_bytes": 10, "backups": -1}, "audit: max_bytes and backups must not be negative"),
        ({"max_bytes": 10, "backups": 0}, "audit: rotation by size needs at least one backup"),
    ],
)
def test_check_sizes_names_the_settings_it_refuses(sizes: dict[str, int], message: str | None) -> None:
    if message is None:
        check_sizes("audit", sizes)
        return
    with pytest.raises(ValueError) as caught:
        check_sizes("audit", sizes)
    assert str(caught.value) == message
