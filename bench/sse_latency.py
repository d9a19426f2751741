"""SSE latency through sidekey vs direct vs mitmdump, one run (issue #17 item 2).

    .venv/bin/python bench/sse_latency.py                       # 64 streams x 200 events, 10 ms apart
    .venv/bin/python bench/sse_latency.py --concurrency 1,64 --repeat 3 --out bench/results-sse.md

Builds `bench/sse_latency/` (Go, stdlib) into /tmp/sse-bin, starts its TLS upstream (one event
at once, then one per `--gap` by a ticker) pinned with the client to CPU 0, and each proxy
pinned to CPU 1, as ../shared/bench does. For each concurrency, in each repeat, the proxies run
one after another: `direct`, `sidekey` (this checkout, a policy with an injected bearer key), and
`mitmdump` (from ../shared/bench's trixie rootfs, `stream_large_bodies=1` so it streams; skipped
when bench/setup.sh has not made the rootfs). The client measures time to first event (TTFE:
request written -> first event line read) and every inter-event gap, in µs. Each worker warms
its connection with one stream first; the measured streams' starts are spread over one stream's
length, so a new request meets the other streams mid-flow rather than all in one burst. The report gives the
medians over repeats of p50/p99 and what each proxy adds to direct.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = Path(os.environ.get("SIDEKEY_SHARED_BENCH", REPO.parent / "shared" / "bench"))
BIN = Path("/tmp/sse-bin/sse_latency")
TRIXIE = Path(os.environ.get("BENCH_TRIXIE_ROOT", "/tmp/bench-trixie"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pinned(cpu: int) -> object:
    return lambda: os.sched_setaffinity(0, {cpu})


def wait_ready(port: int, proc: subprocess.Popen[bytes], ready_file: Path | None, log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"proxy exited {proc.returncode}:\n{log.read_text()[-2000:]}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            if ready_file is None or ready_file.exists():
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"proxy on {port} not ready in 120 s")


def start(argv: list[str], log: Path, cpu: int, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, preexec_fn=pinned(cpu),  # type: ignore[arg-type]
                                start_new_session=True, env=env, cwd=REPO)  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def start_sidekey(
    work: Path, up_port: int, up_ca: Path, hosts: str = "localhost"
) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    policy = work / "policies.yaml"
    policy.write_text(
        f"version: 1\nunmatched: deny\nproviders:\n  bench:\n    hosts: [{hosts}]\n"
        f"    upstream: https://localhost:{up_port}\n    auth: {{type: bearer, secret: env:BENCH_API_KEY}}\n"
        f"    tls: {{ca_bundle: {up_ca}}}\n    pool: {{max_connections: 1024}}\n"
    )
    env = {**os.environ, "BENCH_API_KEY": "test"}
    py = os.environ.get("SIDEKEY_PYTHON", sys.executable)
    argv = [py, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}", "--policies", str(policy),
            "--certs", str(work / "certs"), "--log-level", "WARNING", "--access-log", "off",
            "--admin", "127.0.0.1:0"]  # fmt: skip
    log = work / "sidekey.log"
    proc = start(argv, log, 1, env)
    ca = work / "certs" / "sidekey-ca.pem"
    wait_ready(port, proc, ca, log)
    return proc, port, ca


def start_mitmdump(work: Path, up_ca: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    port = free_port()
    conf = work / "confdir"
    argv = [str(SHARED / "lib" / "in-trixie.sh"), "/opt/mitm/bin/mitmdump", "-q", "--listen-host", "127.0.0.1",
            "--listen-port", str(port), "--set", f"confdir={conf}", "--set", f"ssl_verify_upstream_trusted_ca={up_ca}",
            "--set", "stream_large_bodies=1", "-s", str(SHARED / "lib" / "mitm_inject_auth.py")]  # fmt: skip
    log = work / "mitmdump.log"
    proc = start(argv, log, 1)
    ca = conf / "mitmproxy-ca-cert.pem"
    wait_ready(port, proc, ca, log)
    return proc, port, ca


def run_client(url: str, ca: str, conc: int, rounds: int, proxy: str | None, stagger: str) -> dict[str, object]:
    argv = [str(BIN), "-mode", "client", "-url", url, "-cacert", ca, "-c", str(conc), "-rounds", str(rounds),
            "-stagger", stagger]  # fmt: skip
    if proxy:
        argv += ["-proxy", proxy]
    out = subprocess.run(argv, capture_output=True, text=True, preexec_fn=pinned(0), timeout=900, check=False)  # type: ignore[arg-type]
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(f"client failed: {out.stderr[-2000:]}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def table(results: dict[int, dict[str, list[dict[str, object]]]]) -> str:
    lines = []
    for conc, by_proxy in results.items():
        lines += [f"\n### {conc} concurrent streams\n",
                  "| proxy | TTFE p50 | TTFE p99 | gap p50 | gap p99 | added TTFE p50 | added gap p99 | failed |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]  # fmt: skip
        med: dict[str, dict[str, float]] = {}
        for name, runs in by_proxy.items():

            def m(kind: str, p: str, runs: list[dict[str, object]] = runs) -> float:
                return statistics.median(float(r[kind][p]) for r in runs)  # type: ignore[index]

            med[name] = {k: m(*k.split(".")) for k in ("ttfe_us.p50", "ttfe_us.p99", "gap_us.p50", "gap_us.p99")}
            med[name]["failed"] = sum(int(r["failed_workers"]) for r in runs)  # type: ignore[call-overload]
        base = med.get("direct")
        for name, v in med.items():
            add_ttfe = f"{(v['ttfe_us.p50'] - base['ttfe_us.p50']) / 1000:+.2f} ms" if base else "-"
            add_gap = f"{(v['gap_us.p99'] - base['gap_us.p99']) / 1000:+.2f} ms" if base else "-"
            lines.append(
                f"| {name} | {v['ttfe_us.p50'] / 1000:.2f} ms | {v['ttfe_us.p99'] / 1000:.2f} ms | "
                f"{v['gap_us.p50'] / 1000:.2f} ms | {v['gap_us.p99'] / 1000:.2f} ms | {add_ttfe} | {add_gap} | "
                f"{int(v['failed'])} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--concurrency", default="64")
    ap.add_argument("--events", type=int, default=200)
    ap.add_argument("--gap", default="10ms", help="milliseconds, e.g. 10ms")
    ap.add_argument("--rounds", type=int, default=2, help="measured streams per worker per point (after one warm-up)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--proxies", default="direct,sidekey,mitmdump")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    if not shutil.which("go"):
        raise SystemExit("needs golang-go (apt-get install golang-go)")
    BIN.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["go", "build", "-o", str(BIN), "."], cwd=HERE / "sse_latency", check=True,
                   env={**os.environ, "CGO_ENABLED": "0", "GOFLAGS": "-mod=mod"})  # fmt: skip
    proxies = args.proxies.split(",")
    if "mitmdump" in proxies and not (TRIXIE / "opt/mitm/bin/mitmdump").exists():
        print("mitmdump skipped: run ../shared/bench/setup.sh first", file=sys.stderr)
        proxies.remove("mitmdump")
    results: dict[int, dict[str, list[dict[str, object]]]] = {}
    with tempfile.TemporaryDirectory(prefix="sse-latency-") as tmp:
        run = Path(tmp)
        up_ca = run / "upstream-ca.pem"
        upstream = subprocess.Popen([str(BIN), "-mode", "server", "-ca-out", str(up_ca)], stdout=subprocess.PIPE,
                                    preexec_fn=pinned(0), start_new_session=True)  # type: ignore[arg-type]  # fmt: skip
        assert upstream.stdout is not None
        up_port = int(re.search(rb"listening (\d+)", upstream.stdout.readline()).group(1))  # type: ignore[union-attr]
        url = f"https://localhost:{up_port}/sse?n={args.events}&gap={args.gap}"
        gap_ms = float(args.gap.removesuffix("ms"))
        stagger = f"{int(args.events * gap_ms)}ms"  # one stream's length: starts spread over it
        try:
            for conc in (int(c) for c in args.concurrency.split(",")):
                results[conc] = {p: [] for p in proxies}
                for _ in range(args.repeat):
                    for name in proxies:
                        work = run / f"{name}-{conc}"
                        work.mkdir(exist_ok=True)
                        if name == "direct":
                            results[conc][name].append(run_client(url, str(up_ca), conc, args.rounds, None, stagger))
                            continue
                        if name == "sidekey":
                            proc, port, ca = start_sidekey(work, up_port, up_ca)
                        else:
                            proc, port, ca = start_mitmdump(work, up_ca)
                        try:
                            res = run_client(url, str(ca), conc, args.rounds, f"http://127.0.0.1:{port}", stagger)
                            results[conc][name].append(res)
                        finally:
                            stop(proc)
                        print(name, conc, json.dumps(res), file=sys.stderr)
        finally:
            stop(upstream)
    head = (f"{args.events} events per stream, {args.gap} apart, {args.rounds} stream(s) per worker, "
            f"medians over {args.repeat} repeats; client and upstream on CPU 0, proxy on CPU 1\n")  # fmt: skip
    report = head + table(results)
    print(report)
    if args.out:
        args.out.write_text(report)


if __name__ == "__main__":
    main()
