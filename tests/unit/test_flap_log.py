"""Health flips in the log (Sidekey.notify): one line at the change's level per member per minute,
the rest at DEBUG and counted in the next line; listeners (alerts) still hear every change."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from proxy.balance import FLAP_WINDOW, Transition, UpstreamState
from proxy.policy import Policy, Target
from proxy.server import Sidekey
from proxy.testing import make_provider


def test_a_flapping_member_gets_one_warning_a_minute_and_every_change_reaches_listeners(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    provider = make_provider()
    sidekey = Sidekey(Policy(providers=(provider,)), certs_dir=tmp_path)
    now = [5000.0]
    sidekey.clock = lambda: now[0]
    heard: list[Transition] = []
    sidekey.on_state_change(lambda state, change: heard.append(change))
    state = UpstreamState(provider, Target("default"), "api.example.test", 443)
    flips: list[Transition] = ["unhealthy", "healthy"] * 50
    caplog.set_level(logging.DEBUG, logger="sidekey")
    for change in flips:
        sidekey.notify(state, [change])
    now[0] += FLAP_WINDOW
    sidekey.notify(state, ["unhealthy"])

    assert heard == [*flips, "unhealthy"]
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if "api.example.test" in r.getMessage()]
    told = [(level, text) for level, text in lines if level > logging.DEBUG]
    assert told == [
        (logging.WARNING, "upstream openai/default (api.example.test:443): unhealthy"),
        (logging.WARNING, "upstream openai/default (api.example.test:443): unhealthy (99 more flips since the last line like this, logged at DEBUG)"),
    ]  # fmt: skip
    assert len(lines) == 101
