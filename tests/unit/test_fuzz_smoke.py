"""The atheris harnesses in fuzz/ run for a few thousand inputs each, starting from the
seed corpus in the repository: any exception other than the one each harness documents
(a crash) fails the test. The longer runs and their results are in fuzz/README.md."""

from __future__ import annotations

import re
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# (harness, inputs). A count, not a time: each run is checked to have done all of them.
HARNESSES = [("http1", 5000), ("policy", 3000), ("sse_usage", 3000), ("json_usage", 5000)]

# The bound is on the harness's CPU time, not on the wall clock: CPU seconds for a fixed
# count of inputs do not grow with the machine's load, wall seconds do (at a load average
# of 11 on 2 cores a process gets ~1/5 of a core). Measured 2026-12-06 (start-up included):
# http1 1.9 s, policy 7.0 s, sse_usage 10.2 s, json_usage 5.1 s of CPU. 120 s is ~12x the
# slowest, for a slower CPU and the cache misses of a crowded one; a harness that spins
# (a parser loop that never ends) reaches it on any machine and is killed with SIGXCPU.
# The wall clock is bounded only by the suite's per-test timeout (pyproject.toml), which
# kills the harness with the test.
CPU_SECONDS = 120


def _limit_cpu() -> None:  # in the child, before exec: an rlimit survives exec
    resource.setrlimit(resource.RLIMIT_CPU, (CPU_SECONDS, CPU_SECONDS + 5))


@pytest.mark.parametrize(("name", "runs"), HARNESSES)
def test_fuzz_harness_smoke(name: str, runs: int, tmp_path: Path) -> None:
    new = tmp_path / "new"  # libFuzzer adds what it finds to the first directory: not the repository's
    new.mkdir()
    cmd = [sys.executable, str(REPO / "fuzz" / f"{name}_fuzz.py"), f"-atheris_runs={runs}", "-seed=1"]
    cmd += [f"-artifact_prefix={tmp_path}/"]
    if (REPO / "fuzz" / f"{name}.dict").exists():
        cmd.append(f"-dict={REPO / 'fuzz' / f'{name}.dict'}")
    cmd += [str(new), str(REPO / "fuzz" / "corpus" / name)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, errors="replace", check=False,
                          preexec_fn=_limit_cpu)  # fmt: skip
    log = proc.stdout + proc.stderr
    assert proc.returncode != -signal.SIGXCPU, f"more than {CPU_SECONDS} s of CPU: {log[-2000:]}"
    assert proc.returncode == 0, log[-4000:]
    assert "Uncaught Python exception" not in log
    assert re.search(rf"^Done {runs} (runs )?in ", log, re.M), log[-2000:]  # it ran them all, not stopped early
    assert not list(tmp_path.glob("crash-*"))
