"""The open-files soft limit is raised toward the hard limit at start (#17 item 3)."""

from __future__ import annotations

import resource

import pytest

from proxy.fdlimit import FD_LIMIT_CAP, fd_limit_target

INF = resource.RLIM_INFINITY


@pytest.mark.parametrize(
    ("soft", "hard", "expected"),
    [
        (1024, 4096, 4096),  # the common shell default: raise to the hard limit
        (1024, 1_048_576, 1_048_576),  # systemd's default hard limit
        (4096, 4096, None),  # already there
        (8192, 4096, None),  # soft above hard cannot happen, but never lower it
        (1024, INF, FD_LIMIT_CAP),  # no hard limit: stop at the cap
        (2_000_000, INF, None),  # already above the cap: leave it
        (INF, INF, None),  # unlimited already
        (1024, 1024, None),  # no room: nothing to do
    ],
)
def test_fd_limit_target(soft: int, hard: int, expected: int | None) -> None:
    assert fd_limit_target(soft, hard) == expected
