"""The soak's pass criteria, as pure functions over the sampled rows (no I/O).

- RSS flat: the mean RSS of the last sixth of the load within 5% of the mean
  of its second sixth (for a 60-minute run: the last 10 minutes against
  minutes 10-20; the first 10 minutes are left out because caches, the leaf
  certificate cache and the allocator's arenas fill there).
- File descriptors and asyncio tasks back to the baseline sampled before the
  load, once the load has stopped and idle pooled connections have expired.
- Zero unexpected errors: every request got the answer its kind scripts (200,
  or the upstream's scripted 502/429 passed on), and sidekey logged nothing at
  ERROR or above.
"""

from __future__ import annotations

import csv
from dataclasses import asdict, dataclass, fields
from pathlib import Path

RSS_TOLERANCE = 0.05


@dataclass(frozen=True, slots=True)
class Sample:
    t_s: float  # seconds since the harness started
    phase: str  # before | load | after
    rss_kib: int
    fds: int
    tasks: int
    upstream_conns: int
    client_conns: int
    in_flight: int
    reloads_ok: int
    reloads_failed: int
    requests: int = 0  # in the window that ended at t_s (load only)
    ok: int = 0
    expected_errors: int = 0
    unexpected_errors: int = 0
    p50_ms: float = 0.0
    p99_ms: float = 0.0


@dataclass(frozen=True, slots=True)
class Verdict:
    name: str
    passed: bool
    detail: str


COLUMNS = [f.name for f in fields(Sample)]


def write_csv(path: Path, samples: list[Sample]) -> None:
    with path.open("w", newline="") as out:
        writer = csv.DictWriter(out, fieldnames=COLUMNS)
        writer.writeheader()
        for s in samples:
            writer.writerow(asdict(s))


def read_csv(path: Path) -> list[Sample]:
    types = {f.name: f.type for f in fields(Sample)}
    casts = {"float": float, "int": int, "str": str}
    with path.open() as lines:
        return [Sample(**{k: casts[str(types[k])](v) for k, v in row.items()}) for row in csv.DictReader(lines)]


def _mean(values: list[int]) -> float:
    return sum(values) / len(values) if values else float("nan")


def rss_windows(samples: list[Sample]) -> tuple[float, float]:
    """Mean RSS (KiB) over the load's second sixth and over its last sixth."""
    load = [s for s in samples if s.phase == "load"]
    if not load:
        return float("nan"), float("nan")
    start = min(s.t_s for s in load) - _step(load)  # the first window ended at the first sample
    end = max(s.t_s for s in load)
    sixth = (end - start) / 6
    # A sample belongs to the window its interval ended in: (a, b].
    early = [s.rss_kib for s in load if start + sixth < s.t_s <= start + 2 * sixth]
    late = [s.rss_kib for s in load if s.t_s > end - sixth]
    return _mean(early), _mean(late)


def _step(load: list[Sample]) -> float:
    return load[1].t_s - load[0].t_s if len(load) > 1 else 0.0


def evaluate(samples: list[Sample], unexpected_total: int, error_log_lines: int) -> list[Verdict]:
    early, late = rss_windows(samples)
    drift = (late - early) / early if early == early and early else float("nan")  # nan != nan
    before = [s for s in samples if s.phase == "before"]
    after = [s for s in samples if s.phase == "after"]
    verdicts = [
        Verdict(
            "rss_flat",
            abs(drift) <= RSS_TOLERANCE,
            f"mean RSS {early / 1024:.1f} MiB in the load's second sixth, {late / 1024:.1f} MiB in its last "
            f"sixth: {drift * 100:+.1f}% (limit ±{RSS_TOLERANCE * 100:.0f}%)",
        )
    ]
    if not before or not after:
        missing = "no baseline before the load" if not before else "no sample after the load"
        verdicts += [Verdict("fds_back", False, missing), Verdict("tasks_back", False, missing)]
    else:
        b, a = before[-1], after[-1]
        verdicts.append(Verdict("fds_back", a.fds <= b.fds, f"open fds {b.fds} before the load, {a.fds} after"))
        verdicts.append(
            Verdict("tasks_back", a.tasks <= b.tasks, f"asyncio tasks {b.tasks} before the load, {a.tasks} after")
        )
    verdicts.append(
        Verdict(
            "no_unexpected_errors",
            unexpected_total == 0 and error_log_lines == 0,
            f"{unexpected_total} unexpected answers, {error_log_lines} log lines at ERROR or above",
        )
    )
    return verdicts
