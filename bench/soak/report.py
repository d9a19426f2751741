"""After the run: judge (criteria.py), draw soak.png (matplotlib), write
summary.md and summary.json. Returns the harness's exit status.

Redraw a plot from a CSV: ``python bench/soak/report.py samples.csv soak.png``."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import criteria

SEVERE = re.compile(r"^\S+ (ERROR|CRITICAL) ", re.MULTILINE)
WARNING = re.compile(r"^\S+ WARNING ", re.MULTILINE)
PANELS = [  # (columns, title, unit, scale)
    (("rss_kib",), "RSS", "MiB", 1 / 1024),
    (("fds",), "open file descriptors", "", 1),
    (("tasks",), "asyncio tasks", "", 1),
    (("upstream_conns", "client_conns"), "connections (upstream pool, client)", "", 1),
    (("p50_ms", "p99_ms"), "latency per window (all kinds; p99 is the longest SSE streams, ~6 s by design)", "ms", 1),
    (("requests", "expected_errors", "unexpected_errors"), "requests per window", "", 1),
]


def plot(path: Path, samples: list[criteria.Sample], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    minutes = [s.t_s / 60 for s in samples]
    load = [m for m, s in zip(minutes, samples, strict=True) if s.phase == "load"]
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(10, 2.2 * len(PANELS)), sharex=True)
    for ax, (columns, name, unit, scale) in zip(axes, PANELS, strict=True):
        for column in columns:
            ax.plot(minutes, [getattr(s, column) * scale for s in samples], label=column, linewidth=1)
        if load:
            ax.axvspan(load[0] - (load[1] - load[0] if len(load) > 1 else 0), load[-1], color="0.92", zorder=0)
        ax.set_ylabel(unit or "count")
        ax.set_title(name, fontsize=9, loc="left")
        if unit == "ms":  # p50 is milliseconds, p99 the slow streams' seconds: one scale hides p50
            ax.set_yscale("symlog", linthresh=1)
        else:
            ax.set_ylim(bottom=0)
        if len(columns) > 1:
            ax.legend(fontsize=7, loc="upper right")
        ax.grid(alpha=0.3)
    axes[-1].set_xlabel("minutes since start (shaded: load)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def write(out: Path, run: Path, args: argparse.Namespace, samples: list[criteria.Sample],
          warm: dict[str, Any], total: dict[str, Any]) -> int:  # fmt: skip
    log = (run / "sidekey.log").read_text(errors="replace")
    severe = SEVERE.findall(log)
    unexpected = int(total.get("unexpected_errors", 0)) + int(warm.get("unexpected_errors", 0))
    verdicts = criteria.evaluate(samples, unexpected, len(severe))
    passed = all(v.passed for v in verdicts)
    criteria.write_csv(out / "samples.csv", samples)
    title = f"sidekey soak: {args.duration} at c={args.concurrency}, reload every {args.reload_every:g} s"
    plot(out / "soak.png", samples, title)
    load = [s for s in samples if s.phase == "load"]
    peak = max((s.rss_kib for s in samples), default=0)
    reloads = samples[-1].reloads_ok if samples else 0
    reload_failures = samples[-1].reloads_failed if samples else 0
    summary = {
        "passed": passed,
        "verdicts": [{"name": v.name, "passed": v.passed, "detail": v.detail} for v in verdicts],
        "duration": args.duration, "concurrency": args.concurrency, "interval_s": args.interval,
        "requests": total.get("requests", 0), "ok": total.get("ok", 0),
        "expected_errors": total.get("expected_errors", 0), "unexpected_errors": unexpected,
        "unexpected": {**warm.get("unexpected", {}), **total.get("unexpected", {})},
        "kinds": total.get("kinds", {}), "p50_ms": total.get("p50_ms"), "p99_ms": total.get("p99_ms"),
        "rps": round(total.get("requests", 0) / args.seconds, 1), "peak_rss_mib": round(peak / 1024, 1),
        "reloads_ok": reloads, "reloads_failed": reload_failures, "samples_under_load": len(load),
        "log_errors": len(severe), "log_warnings": len(WARNING.findall(log)),
    }  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(markdown(summary, verdicts, title))
    print(f"soak: {'PASS' if passed else 'FAIL'}; {out}/summary.md")
    for v in verdicts:
        print(f"  {'ok  ' if v.passed else 'FAIL'} {v.name}: {v.detail}")
    return 0 if passed else 1


def markdown(s: dict[str, Any], verdicts: list[criteria.Verdict], title: str) -> str:
    lines = [
        f"# {title}",
        "",
        f"**{'PASS' if s['passed'] else 'FAIL'}**",
        "",
        "| criterion | result | measured |",
        "|---|---|---|",
        *(f"| {v.name} | {'pass' if v.passed else 'FAIL'} | {v.detail} |" for v in verdicts),
        "",
        "Pass criteria: RSS flat (mean of the load's last sixth within 5% of its second sixth: for 60 minutes,",
        "the last 10 minutes against minutes 10-20); open fds and asyncio tasks back to the baseline sampled",
        "before the load once it stopped; zero unexpected errors (every answer as its request kind scripts, and",
        "nothing logged at ERROR or above).",
        "",
        f"- requests: {s['requests']} ({s['rps']}/s): {s['ok']} ok, {s['expected_errors']} scripted upstream errors"
        f" passed on (502, 429), {s['unexpected_errors']} unexpected",
        f"- by kind: {', '.join(f'{k} {n}' for k, n in sorted(s['kinds'].items()))}",
        f"- latency over the whole run (all kinds, streams included): p50 {s['p50_ms']} ms, p99 {s['p99_ms']} ms",
        f"- policy reloads: {s['reloads_ok']} applied, {s['reloads_failed']} failed",
        f"- peak RSS {s['peak_rss_mib']} MiB; {s['samples_under_load']} samples under load, every "
        f"{s['interval_s']:g} s; log lines: {s['log_warnings']} WARNING, {s['log_errors']} ERROR or above",
    ]
    if s["unexpected"]:
        lines += ["", "Unexpected answers:", ""]
        lines += [f"- {n} × `{reason}`" for reason, n in sorted(s["unexpected"].items(), key=lambda kv: -kv[1])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import sys

    rows = criteria.read_csv(Path(sys.argv[1]))
    plot(Path(sys.argv[2]), rows, sys.argv[3] if len(sys.argv) > 3 else f"sidekey soak: {sys.argv[1]}")
