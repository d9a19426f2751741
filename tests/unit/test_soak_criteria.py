"""The soak's pass criteria (bench/soak/criteria.py) on made-up samples."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

_PATH = Path(__file__).resolve().parents[2] / "bench" / "soak" / "criteria.py"
_spec = importlib.util.spec_from_file_location("soak_criteria", _PATH)
assert _spec is not None and _spec.loader is not None
criteria = importlib.util.module_from_spec(_spec)
sys.modules["soak_criteria"] = criteria  # dataclasses look the module up by name
_spec.loader.exec_module(criteria)


def run(rss: list[int], *, fds: tuple[int, int] = (16, 16), tasks: tuple[int, int] = (14, 14)) -> list[Any]:
    """A baseline sample, one load sample per RSS value 10 s apart, one after."""
    s = criteria.Sample
    samples = [s(0.0, "before", rss[0], fds[0], tasks[0], 0, 0, 0, 0, 0)]
    samples += [s(10.0 * (i + 1), "load", v, 200, 140, 64, 64, 64, 0, 0, 500, 480, 20) for i, v in enumerate(rss)]
    samples.append(s(10.0 * (len(rss) + 2), "after", rss[-1], fds[1], tasks[1], 0, 0, 0, 0, 0))
    return samples


def verdicts(samples: list[Any], unexpected: int = 0, log_errors: int = 0) -> dict[str, bool]:
    return {v.name: v.passed for v in criteria.evaluate(samples, unexpected, log_errors)}


# 60 samples = 10 minutes of load: the windows are samples 11-20 (second sixth) and 51-60 (last sixth).
@pytest.mark.parametrize(
    ("rss", "flat"),
    [
        ([1000] * 60, True),
        ([500] * 10 + [1000] * 50, True),  # growth in the first sixth (caches filling) is left out
        ([1000] * 50 + [1049] * 10, True),  # +4.9%
        ([1000] * 50 + [1060] * 10, False),  # +6%
        ([1000] * 50 + [940] * 10, False),  # -6%: not flat either
        ([1000 + 10 * i for i in range(60)], False),  # a steady climb: +33%
    ],
)
def test_rss_flat(rss: list[int], flat: bool) -> None:
    assert verdicts(run(rss))["rss_flat"] is flat


def test_rss_windows_are_the_second_and_last_sixths() -> None:
    rss = [1] * 10 + [100] * 10 + [1] * 30 + [300] * 10
    assert criteria.rss_windows(run(rss)) == (100.0, 300.0)


@pytest.mark.parametrize(
    ("fds", "tasks", "expected"),
    [
        ((16, 16), (14, 14), {"fds_back": True, "tasks_back": True}),
        ((16, 15), (14, 13), {"fds_back": True, "tasks_back": True}),
        ((16, 17), (14, 14), {"fds_back": False, "tasks_back": True}),
        ((16, 16), (14, 15), {"fds_back": True, "tasks_back": False}),
    ],
)
def test_fds_and_tasks_back_to_baseline(
    fds: tuple[int, int], tasks: tuple[int, int], expected: dict[str, bool]
) -> None:
    got = verdicts(run([1000] * 12, fds=fds, tasks=tasks))
    assert {k: got[k] for k in expected} == expected


def test_no_baseline_or_no_after_sample_fails() -> None:
    samples = [s for s in run([1000] * 12) if s.phase != "after"]
    got = verdicts(samples)
    assert got["fds_back"] is False and got["tasks_back"] is False


@pytest.mark.parametrize(("unexpected", "log_errors", "passed"), [(0, 0, True), (1, 0, False), (0, 1, False)])
def test_unexpected_errors(unexpected: int, log_errors: int, passed: bool) -> None:
    assert verdicts(run([1000] * 12), unexpected, log_errors)["no_unexpected_errors"] is passed


def test_csv_round_trip(tmp_path: Path) -> None:
    samples = run([1000, 1001, 1002])
    criteria.write_csv(tmp_path / "s.csv", samples)
    assert criteria.read_csv(tmp_path / "s.csv") == samples
