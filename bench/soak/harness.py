"""The soak: sidekey under a mixed load for a given time, sampled every few
seconds, then judged (criteria.py), plotted (plot.py) and summed up.

    bench/soak.sh 60m [--out DIR] [--interval 10] [--concurrency 64] [--reload-every 30]

Starts its own upstream (upstream.py: nginx, a throwaway CA), sidekey with a
policy that turns on retries, circuits, usage metering, limits and audit, and
the Go load client (mixload/). Rewrites the policy every --reload-every
seconds (a real change, so each one is a reload). Writes samples.csv,
soak.png, summary.md and summary.json into --out; exit status 0 when every
criterion passed, 1 when one failed, 2 when the run could not be made.
Everything it starts is stopped by PID at exit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import criteria  # noqa: E402
import upstream  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
LISTENING = re.compile(r"sidekey listening on 127\.0\.0\.1:(\d+)")
ADMIN = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")


def duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    if text[-1:] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def policy(port: int, ca: Path, generation: int) -> str:
    """Both providers on the same nginx; the generation changes a limit by one
    so every rewrite is a real reload (a new digest), not a no-op."""
    common = f"""    upstream: https://localhost:{port}
    auth: {{type: bearer, secret: env:SOAK_API_KEY}}
    tls: {{ca_bundle: {ca}}}
    pool: {{max_connections: 100, keepalive_timeout: 5s}}
    retry: {{attempts: 2, backoff_base: 50ms, backoff_cap: 200ms}}
    circuit: {{failures: 50, ratio: 0.9, min_requests: 100, window: 30s, cooldown: 5s}}
"""
    return f"""# written by bench/soak/harness.py, generation {generation}
version: 1
unmatched: deny
providers:
  soak:
    hosts: [api.soak.test]
{common}    limits: {{requests_per_minute: {1_000_000 + generation % 2}, tokens_per_minute: 100000000, concurrent: 999}}
    caller_limits: {{requests_per_minute: 1000000}}
    budget: {{daily_usd: 1000000}}
  flaky:
    hosts: [flaky.soak.test]
{common}    limits: {{requests_per_minute: 1000000}}
"""


class Soak:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.run = Path(args.workdir or f"/tmp/sidekey-soak-{os.getpid()}").resolve()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.samples: list[criteria.Sample] = []
        self.started = time.monotonic()
        self.generation = 0
        self.sidekey: subprocess.Popen[bytes] | None = None
        self.admin_port = 0

    # -- processes ---------------------------------------------------------
    def start(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.run.mkdir(parents=True, exist_ok=True)
        ca = self.run / "upstream-ca"
        upstream.make_ca(ca)
        self.up_port = free_port()
        self.procs.append(upstream.start_nginx(self.run, self.up_port, ca))
        wait_port(self.up_port, self.procs[-1], self.run / "nginx.out")
        self.policy_path = self.run / "policies.yaml"
        self.ca = ca / "ca.pem"
        self.policy_path.write_text(policy(self.up_port, self.ca, 0))
        log = (self.run / "sidekey.log").open("wb")
        cmd = [sys.executable, "-m", "proxy", "run", "--listen", "127.0.0.1:0", "--policies", str(self.policy_path),
               "--certs", str(self.run / "certs"), "--log-level", "INFO", "--log-format", "text",
               "--admin", "127.0.0.1:0", "--audit", str(self.run / "audit.jsonl"),
               *os.environ.get("SOAK_SIDEKEY_ARGS", "").split()]  # fmt: skip  # e.g. a diagnostic --addon
        env = {**os.environ, "SOAK_API_KEY": "soak-test-key"}
        self.sidekey = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)  # fmt: skip
        log.close()
        self.procs.append(self.sidekey)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            text = (self.run / "sidekey.log").read_text(errors="replace")
            found, admin = LISTENING.search(text), ADMIN.search(text)
            if found and admin:
                self.port, self.admin_port = int(found.group(1)), int(admin.group(1))
                return
            if self.sidekey.poll() is not None:
                raise RuntimeError(f"sidekey exited {self.sidekey.returncode}:\n{text}")
            time.sleep(0.1)
        raise RuntimeError("sidekey did not start in 120 s")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(5)

    def mixload(self, seconds: float, concurrency: int, interval: float) -> subprocess.Popen[bytes]:
        cmd = [self.args.mixload, "-proxy", f"http://127.0.0.1:{self.port}", "-cacert",
               str(self.run / "certs" / "sidekey-ca.pem"), "-c", str(concurrency), "-d", f"{seconds}s",
               "-interval", f"{interval}s"]  # fmt: skip
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=(self.run / "mixload.err").open("ab"),
                                start_new_session=True)  # fmt: skip
        self.procs.append(proc)
        return proc

    # -- sampling ----------------------------------------------------------
    def sample(self, phase: str, window: dict[str, float] | None = None) -> criteria.Sample:
        assert self.sidekey is not None
        pid = self.sidekey.pid
        rss = 0
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        m = scrape(f"http://127.0.0.1:{self.admin_port}/metrics")
        w = window or {}
        s = criteria.Sample(
            t_s=round(time.monotonic() - self.started, 1), phase=phase, rss_kib=rss, fds=fds,
            tasks=int(m.get("sidekey_asyncio_tasks", -1)),
            upstream_conns=int(m.get("sidekey_upstream_connections", 0)),
            client_conns=int(m.get("sidekey_client_connections", 0)),
            in_flight=int(m.get("sidekey_requests_in_flight", 0)),
            reloads_ok=int(m.get('sidekey_policy_reloads_total{result="ok"}', 0)),
            reloads_failed=int(sum(v for k, v in m.items() if k.startswith("sidekey_policy_reloads_total{")
                                   and 'result="ok"' not in k)),
            requests=int(w.get("requests", 0)), ok=int(w.get("ok", 0)),
            expected_errors=int(w.get("expected_errors", 0)), unexpected_errors=int(w.get("unexpected_errors", 0)),
            p50_ms=float(w.get("p50_ms", 0.0)), p99_ms=float(w.get("p99_ms", 0.0)),
        )  # fmt: skip
        self.samples.append(s)
        criteria.write_csv(self.out / "samples.csv", self.samples)  # kept current: a crash keeps the data
        return s

    def settle(self, phase: str, baseline: criteria.Sample | None) -> None:
        """Sample every interval until nothing is in flight, no pooled
        connection is left (keepalive 5 s) and, after the load, fds and tasks
        are back to the baseline; at most --settle-timeout seconds."""
        deadline = time.monotonic() + self.args.settle_timeout
        while True:
            time.sleep(self.args.interval)
            s = self.sample(phase)
            idle = s.in_flight == 0 and s.client_conns == 0 and s.upstream_conns == 0
            back = baseline is None or (s.fds <= baseline.fds and s.tasks <= baseline.tasks)
            if (idle and back) or time.monotonic() > deadline:
                return

    def reloader(self, stop: threading.Event) -> None:
        while not stop.wait(self.args.reload_every):
            self.generation += 1
            tmp = self.policy_path.with_suffix(".tmp")
            tmp.write_text(policy(self.up_port, self.ca, self.generation))
            os.replace(tmp, self.policy_path)  # atomic, as an editor or a ConfigMap swap does

    # -- the run -----------------------------------------------------------
    def soak(self) -> tuple[dict[str, object], dict[str, object]]:
        args = self.args
        warm = self.mixload(min(5.0, args.seconds), 8, 60)  # every kind once or more, certs minted
        warm_out, _ = warm.communicate()
        warm_total = json.loads(warm_out.decode().strip().splitlines()[-1])
        self.settle("before", None)
        baseline = self.samples[-1]
        stop = threading.Event()
        thread = threading.Thread(target=self.reloader, args=(stop,), daemon=True)
        thread.start()
        load = self.mixload(args.seconds, args.concurrency, args.interval)
        assert load.stdout is not None
        total: dict[str, object] = {}
        for raw in load.stdout:
            line = json.loads(raw)
            if line["final"]:
                total = line
            else:
                self.sample("load", line)
        load.wait()
        stop.set()
        thread.join()
        self.settle("after", baseline)
        return warm_total, total


def scrape(url: str) -> dict[str, float]:
    """Prometheus text into {name{labels}: value}, the upstream connection
    gauge summed over hosts and states."""
    with urllib.request.urlopen(url, timeout=30) as answer:
        text = answer.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        values[key] = float(value)
        if key.startswith("sidekey_upstream_connections{"):
            values["sidekey_upstream_connections"] = values.get("sidekey_upstream_connections", 0) + float(value)
    return values


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"upstream exited {proc.returncode}: {log.read_text(errors='replace')}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
            return
        time.sleep(0.1)
    raise RuntimeError(f"upstream not listening on {port} after 60 s")


def main() -> int:
    parser = argparse.ArgumentParser(description="sidekey soak", prog="bench/soak.sh")
    parser.add_argument("duration", help="load time: 60m, 30s, 1h")
    parser.add_argument("--out", default=f"/tmp/sidekey-soak-out-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--workdir", help="scratch dir (logs, certs, policy); default /tmp/sidekey-soak-PID")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--reload-every", type=float, default=30.0, help="seconds between policy rewrites")
    parser.add_argument("--settle-timeout", type=float, default=120.0)
    parser.add_argument("--mixload", default=os.environ.get("SOAK_MIXLOAD", "/tmp/sidekey-soak-bin/mixload"))
    args = parser.parse_args()
    args.seconds = duration(args.duration)
    # SIGTERM (or a test's timeout) must still stop nginx, sidekey and mixload: they run in
    # their own sessions, so only the finally below reaches them.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    soak = Soak(args)
    try:
        soak.start()
        warm, total = soak.soak()
    except (RuntimeError, OSError, ValueError) as err:
        print(f"soak: {err}", file=sys.stderr)
        return 2
    finally:
        soak.stop()
    import report  # matplotlib is imported only here, once the run is done

    return report.write(soak.out, soak.run, args, soak.samples, warm, total)


if __name__ == "__main__":
    sys.exit(main())
