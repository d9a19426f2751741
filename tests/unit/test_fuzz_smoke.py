"""The atheris harnesses in fuzz/ run for a few thousand inputs each, starting from the
seed corpus in the repository: any exception other than the one each harness documents
(a crash) fails the test. The longer runs and their results are in fuzz/README.md."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

# (harness, inputs): about 5-15 s each on a loaded 2-core machine; the policy loader and
# the SSE meter (fed three ways per input) are the slow ones.
HARNESSES = [("http1", 5000), ("policy", 3000), ("sse_usage", 3000), ("json_usage", 5000)]


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("name", "runs"), HARNESSES)
def test_fuzz_harness_smoke(name: str, runs: int, tmp_path: Path) -> None:
    new = tmp_path / "new"  # libFuzzer adds what it finds to the first directory: not the repository's
    new.mkdir()
    cmd = [sys.executable, str(REPO / "fuzz" / f"{name}_fuzz.py"), f"-atheris_runs={runs}", "-seed=1"]
    cmd += [f"-artifact_prefix={tmp_path}/"]
    if (REPO / "fuzz" / f"{name}.dict").exists():
        cmd.append(f"-dict={REPO / 'fuzz' / f'{name}.dict'}")
    cmd += [str(new), str(REPO / "fuzz" / "corpus" / name)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, errors="replace", timeout=170, check=False)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "Uncaught Python exception" not in log
    assert re.search(rf"^Done {runs} (runs )?in ", log, re.M), log[-2000:]  # it ran them all, not stopped early
    assert not list(tmp_path.glob("crash-*"))
