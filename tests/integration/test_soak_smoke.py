"""The soak harness (bench/soak.sh) for a few seconds, so it cannot rot: it
builds its load client, starts its upstream and sidekey, drives every request
kind, reloads the policy, samples, and writes the CSV, the plot and the
summary. A run this short cannot judge RSS (the 60-minute run does, see
docs/reliability.md); fds, tasks and unexpected errors it can and does."""

from __future__ import annotations

import csv
import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KINDS = {"chat", "small", "sse_short", "sse_medium", "sse_long", "big", "flaky_ok", "flaky_502", "flaky_429"}


def _processes_using(workdir: Path) -> list[str]:
    """Command lines that name the run's scratch dir (nginx, sidekey, mixload all do)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone, or not a process dir
            continue
        if str(workdir) in cmdline and "pytest" not in cmdline:
            found.append(cmdline)
    return found


def test_soak_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    run = subprocess.Popen(
        [str(REPO / "bench" / "soak.sh"), "20s", "--interval", "2", "--reload-every", "4", "--out", str(out),
         "--workdir", str(tmp_path / "run"), "--settle-timeout", "90"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        output, _ = run.communicate(timeout=280)
    finally:
        if run.poll() is None:  # SIGTERM, not SIGKILL: the harness then stops nginx, sidekey and mixload
            run.terminate()
            run.wait(60)
    assert run.returncode in (0, 1), output  # 2: the run could not be made
    assert not _processes_using(tmp_path / "run"), "the harness left a process running"
    summary = json.loads((out / "summary.json").read_text())
    verdicts = {v["name"]: v for v in summary["verdicts"]}
    assert set(verdicts) == {"rss_flat", "fds_back", "tasks_back", "no_unexpected_errors"}
    for name in ("fds_back", "tasks_back", "no_unexpected_errors"):
        assert verdicts[name]["passed"], (verdicts[name], summary["unexpected"])
    assert run.returncode == (0 if verdicts["rss_flat"]["passed"] else 1)
    assert set(summary["kinds"]) == KINDS  # 20 s at c=64 draws each kind (the rarest is 1 in 200)
    assert summary["requests"] == summary["ok"] + summary["expected_errors"] > 0
    assert summary["expected_errors"] == summary["kinds"]["flaky_502"] + summary["kinds"]["flaky_429"]
    assert summary["reloads_ok"] >= 2 and summary["reloads_failed"] == 0
    with (out / "samples.csv").open() as lines:
        rows = list(csv.DictReader(lines))
    assert {r["phase"] for r in rows} == {"before", "load", "after"}
    assert all(int(r["tasks"]) > 0 and int(r["rss_kib"]) > 0 for r in rows)
    assert sum(int(r["requests"]) for r in rows) == summary["requests"]  # every window is in the CSV
    assert (out / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (out / "summary.md").read_text()
    assert "fds_back" in text and "requests:" in text
    assert "soak-test-key" not in (tmp_path / "run" / "sidekey.log").read_text()  # the injected secret
