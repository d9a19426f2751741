"""A sidekey started with a low open-files soft limit raises it to the hard limit (#17 item 3)."""

from __future__ import annotations

import resource
from pathlib import Path

from tests.integration.sidekey_process import SidekeyProcess

POLICY = """\
version: 1
providers:
  example:
    hosts: [api.example.test]
    auth: {type: bearer, secret: "env:SIDEKEY_TEST_UNUSED"}
"""


def _low_soft_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))


def _soft_limit_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no 'Max open files' line")


def test_soft_limit_is_raised_to_the_hard_limit(tmp_path: Path) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    expected = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    proc = SidekeyProcess(tmp_path, POLICY, env={"SIDEKEY_TEST_UNUSED": "x"}, preexec=_low_soft_limit).start()
    try:
        assert _soft_limit_of(proc.pid) == expected
        if expected != 256:
            assert f"open-files limit raised from 256 to {expected}" in proc.log()
    finally:
        proc.stop()
