"""New client connections and new hosts: handshakes/s and proxy CPU per handshake (issue #17 item 4).

    .venv/bin/python bench/handshakes.py                      # c=32, 5 s per point, 3 repeats
    .venv/bin/python bench/handshakes.py --duration 5 --repeat 3 --out /tmp/handshakes.md

One run, proxies interleaved, client and upstream pinned to CPU 0 and the proxy to CPU 1. The
client is `bench/sse_latency/` in its `conns` mode: each of c workers sends `GET /small`
(41 bytes) over a new connection per request (no keep-alive, as curl-per-call clients do):

- `keep-alive`: one connection per worker, reused (the baseline cost of the request itself);
- `new conn`: a new CONNECT and a full TLS handshake with the proxy per request (cached leaf);
- `new conn, resumed`: the same with a TLS session cache in the client, so a proxy that issues
  session tickets can resume;
- `new host`: a new CONNECT host per request (`hN.bench.test`), so the proxy mints a leaf
  certificate per request (sidekey only: mitmdump would resolve the name upstream).

Proxy CPU per request is its CPU time (utime + stime from /proc) over the point / requests; the
handshake's own cost is that minus the keep-alive figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sse_latency as common  # noqa: E402 - the sibling script's process helpers

TICK = os.sysconf("SC_CLK_TCK")
MODES = {
    "keep-alive": ["-keepalive"],
    "new conn": [],
    "new conn, resumed": ["-resume"],
    "new host": ["-hosts", "1"],
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def point(url: str, ca: str, conc: int, seconds: float, proxy: str | None, pid: int | None, mode: list[str]) -> dict:
    argv = [str(common.BIN), "-mode", "conns", "-url", url, "-cacert", ca, "-c", str(conc), "-d", f"{seconds}s", *mode]
    if proxy:
        argv += ["-proxy", proxy]
    before = cpu_seconds(pid) if pid else 0.0
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=common.pinned(0), timeout=600, check=False)  # type: ignore[arg-type]
    after = cpu_seconds(pid) if pid else 0.0
    if out.returncode != 0:
        raise SystemExit(f"client failed: {out.stderr[-2000:]}")
    res: dict = json.loads(out.stdout.strip().splitlines()[-1])
    res["proxy_cpu_us_per_req"] = 1e6 * (after - before) / max(res["ok"], 1) if pid else None
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--proxies", default="direct,sidekey,mitmdump")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    subprocess.run(["go", "build", "-o", str(common.BIN), "."], cwd=common.HERE / "sse_latency", check=True,
                   env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"})  # fmt: skip
    proxies = args.proxies.split(",")
    if "mitmdump" in proxies and not (common.TRIXIE / "opt/mitm/bin/mitmdump").exists():
        print("mitmdump skipped: run ../shared/bench/setup.sh first", file=sys.stderr)
        proxies.remove("mitmdump")
    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="handshakes-") as tmp:
        run = Path(tmp)
        up_ca = run / "upstream-ca.pem"
        upstream = subprocess.Popen([str(common.BIN), "-mode", "server", "-ca-out", str(up_ca)], stdout=subprocess.PIPE,
                                    preexec_fn=common.pinned(0), start_new_session=True)  # type: ignore[arg-type]  # fmt: skip
        assert upstream.stdout is not None
        up_port = int(upstream.stdout.readline().split()[1])
        url = f"https://localhost:{up_port}/small"
        try:
            for _ in range(args.repeat):
                for name in proxies:
                    work = Path(tempfile.mkdtemp(dir=run, prefix=name))
                    if name == "direct":
                        for mode in ("keep-alive", "new conn", "new conn, resumed"):
                            res = point(url, str(up_ca), args.concurrency, args.duration, None, None, MODES[mode])
                            rows.setdefault((name, mode), []).append(res)
                        continue
                    if name == "sidekey":
                        proc, port, ca = common.start_sidekey(work, up_port, up_ca, hosts='localhost, "*.bench.test"')
                    else:
                        proc, port, ca = common.start_mitmdump(work, up_ca)
                    try:
                        for mode, flags in MODES.items():
                            if mode == "new host" and name != "sidekey":
                                continue
                            res = point(url, str(ca), args.concurrency, args.duration, f"http://127.0.0.1:{port}",
                                        proc.pid, flags)  # fmt: skip
                            rows.setdefault((name, mode), []).append(res)
                            print(name, mode, json.dumps(res), file=sys.stderr)
                    finally:
                        common.stop(proc)
        finally:
            common.stop(upstream)
    lines = [f"c={args.concurrency}, {args.duration:g} s per point, medians over {args.repeat} repeats; "
             "client and upstream on CPU 0, proxy on CPU 1\n",
             "| proxy | mode | requests/s | p50 ms | p99 ms | resumed | proxy CPU µs/req | failed |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
    for (name, mode), runs in rows.items():
        med = statistics.median
        cpu = [r["proxy_cpu_us_per_req"] for r in runs if r["proxy_cpu_us_per_req"] is not None]
        ok = sum(r["ok"] for r in runs)
        resumed = sum(r["resumed"] for r in runs)
        p50 = med(r["latency_us"]["p50"] for r in runs) / 1000
        p99 = med(r["latency_us"]["p99"] for r in runs) / 1000
        cpu_text = f"{med(cpu):,.0f}" if cpu else "-"
        lines.append(
            f"| {name} | {mode} | {med(r['rps'] for r in runs):,.0f} | {p50:.2f} | {p99:.2f} | "
            f"{100 * resumed / max(ok, 1):.0f}% | {cpu_text} | {sum(r['failed'] for r in runs)} |"
        )
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
