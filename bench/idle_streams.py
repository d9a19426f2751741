"""Many idle SSE streams through one sidekey: memory per stream, idle CPU, descriptors (#17 item 3).

    .venv/bin/python bench/idle_streams.py --streams 10000 --gap 10 --idle-window 60

Starts a TLS upstream (aiohttp, its own trustme CA, in a child process) that sends one SSE
event every ``--gap`` seconds on each open stream, a sidekey process in front of it (the
repo's code, this venv), and ``--streams`` clients that each CONNECT through sidekey, do TLS
to sidekey's minted leaf and hold one ``GET /events`` open. It reads sidekey's RSS, open
descriptors and CPU time from /proc: before the streams (after ``--warm`` warm-up streams,
so the CA, the leaf and the upstream pool exist), with all streams open, and the CPU spent
over ``--idle-window`` seconds while they idle. Prints one JSON object.

Descriptors: sidekey needs about two per stream, the upstream and this client one each. As
root the script raises all three processes' limits to ``--nofile``; otherwise the hard limit
given by the shell caps ``--streams``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing
import os
import resource
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HOST = "api.idle.test"
REPO = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def set_nofile(n: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (n, max(n, hard)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def upstream_main(port: int, cert_dir: str, gap: float, nofile: int) -> None:
    from aiohttp import web

    set_nofile(nofile)
    logging.getLogger("aiohttp").setLevel(logging.CRITICAL)  # streams cut at the end are expected
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(f"{cert_dir}/server.pem", f"{cert_dir}/server.key")

    async def events(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        n = 0
        while True:
            await resp.write(f'data: {{"n": {n}}}\n\n'.encode())
            n += 1
            await asyncio.sleep(gap)

    app = web.Application()
    app.router.add_get("/events", events)
    web.run_app(app, host="127.0.0.1", port=port, ssl_context=ctx, print=None, handle_signals=True)


def proc_stats(pid: int) -> dict[str, float]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_s = (int(fields[11]) + int(fields[12])) / TICK  # utime, stime
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    return {"rss_kib": rss_kib, "cpu_s": cpu_s, "fds": fds}


class Streams:
    def __init__(self, proxy_port: int, ca: str) -> None:
        self.proxy_port = proxy_port
        self.ctx = ssl.create_default_context(cafile=ca)
        self.open = 0
        self.events = 0
        self.failed = 0
        self.failures: dict[str, int] = {}
        self.tasks: list[asyncio.Task[None]] = []

    async def one(self, opened: asyncio.Semaphore) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.proxy_port)
            writer.write(f"CONNECT {HOST}:443 HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(head[:40])
            await writer.start_tls(self.ctx, server_hostname=HOST)
            request = f"GET /events HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: Bearer placeholder\r\n\r\n"
            writer.write(request.encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if b" 200 " not in head.split(b"\r\n", 1)[0]:
                raise ConnectionError(head[:40])
        except (OSError, asyncio.IncompleteReadError, ConnectionError, ssl.SSLError) as exc:
            self.failed += 1
            why = f"{type(exc).__name__}: {str(exc)[:60]}"
            self.failures[why] = self.failures.get(why, 0) + 1
            opened.release()
            return
        self.open += 1
        opened.release()
        try:
            while chunk := await reader.read(4096):
                self.events += chunk.count(b"data:")
        finally:
            self.open -= 1
            writer.close()

    async def open_streams(self, n: int, concurrency: int) -> None:
        opening = asyncio.Semaphore(concurrency)
        for _ in range(n):
            await opening.acquire()
            self.tasks.append(asyncio.create_task(self.one(opening)))
        for _ in range(concurrency):  # every started open has finished (opened or failed)
            await opening.acquire()


def start_sidekey(work: Path, up_port: int, ca_pem: str, nofile: int) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    policy = work / "policies.yaml"
    policy.write_text(
        "version: 1\nproviders:\n  idle:\n"
        f"    hosts: [{HOST}]\n    upstream: https://localhost:{up_port}\n"
        "    auth: {type: bearer, secret: env:IDLE_KEY}\n"
        f"    tls: {{ca_bundle: {ca_pem}}}\n"
        "    timeouts: {connect: 10, read: 120}\n"
        "    pool: {max_connections: 65536}\n"  # one upstream connection per open stream
    )
    env = {**os.environ, "IDLE_KEY": "sk-idle-bench-key"}
    cmd = [sys.executable, "-m", "proxy", "run", "--listen", f"127.0.0.1:{port}", "--policies", str(policy),
           "--certs", str(work / "certs"), "--admin", "127.0.0.1:0", "--log-level", "WARNING",
           "--access-log", "off"]  # fmt: skip
    log = open(work / "sidekey.log", "wb")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: set_nofile(nofile))  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                raise SystemExit((work / "sidekey.log").read_text()) from None
            time.sleep(0.1)
    raise SystemExit("sidekey did not start")


async def measure(args: argparse.Namespace, pid: int, up_pid: int, port: int, ca: str) -> dict[str, object]:
    streams = Streams(port, ca)
    await streams.open_streams(args.warm, 8)
    await asyncio.sleep(args.settle)
    before, up_before = proc_stats(pid), proc_stats(up_pid)
    started = time.monotonic()
    await streams.open_streams(args.streams, args.open_concurrency)
    open_s = time.monotonic() - started
    await asyncio.sleep(args.settle)
    loaded = proc_stats(pid)
    events_before = streams.events
    await asyncio.sleep(args.idle_window)
    after, up_after = proc_stats(pid), proc_stats(up_pid)
    held = streams.open - args.warm
    result = {
        "streams_asked": args.streams,
        "streams_open": held,
        "failed": streams.failed,
        "failures": streams.failures,
        "open_seconds": round(open_s, 1),
        "gap_s": args.gap,
        "rss_before_kib": before["rss_kib"],
        "rss_open_kib": loaded["rss_kib"],
        "rss_after_idle_kib": after["rss_kib"],
        "kib_per_stream": round((after["rss_kib"] - before["rss_kib"]) / max(held, 1), 2),
        # The upstream (aiohttp, stdlib asyncio, one TLS connection per stream): what one
        # idle TLS stream costs a Python server, for comparison with sidekey's two.
        "upstream_kib_per_stream": round((up_after["rss_kib"] - up_before["rss_kib"]) / max(held, 1), 2),
        "fds_before": before["fds"],
        "fds_open": loaded["fds"],
        "idle_window_s": args.idle_window,
        "idle_cpu_percent_of_core": round(100 * (after["cpu_s"] - loaded["cpu_s"]) / args.idle_window, 2),
        "events_per_s_during_idle": round((streams.events - events_before) / args.idle_window, 1),
    }
    for task in streams.tasks:
        task.cancel()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--gap", type=float, default=10.0, help="seconds between upstream events per stream")
    parser.add_argument("--idle-window", type=float, default=30.0)
    parser.add_argument("--settle", type=float, default=5.0)
    parser.add_argument("--warm", type=int, default=10)
    parser.add_argument("--open-concurrency", type=int, default=64)
    parser.add_argument("--nofile", type=int, default=65536)
    args = parser.parse_args()
    set_nofile(args.nofile)

    import trustme

    with tempfile.TemporaryDirectory(prefix="sidekey-idle-") as tmp:
        work = Path(tmp)
        ca = trustme.CA()
        ca.cert_pem.write_to_path(str(work / "upstream-ca.pem"))
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        leaf.private_key_pem.write_to_path(str(work / "server.key"))
        leaf.cert_chain_pems[0].write_to_path(str(work / "server.pem"))
        up_port = free_port()
        upstream = multiprocessing.get_context("spawn").Process(
            target=upstream_main, args=(up_port, str(work), args.gap, args.nofile), daemon=True
        )
        upstream.start()
        proc, port = start_sidekey(work, up_port, str(work / "upstream-ca.pem"), args.nofile)
        try:
            ca = str(work / "certs" / "sidekey-ca.pem")
            result = asyncio.run(measure(args, proc.pid, upstream.pid or 0, port, ca))
        finally:
            proc.terminate()
            proc.wait(30)
            upstream.terminate()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
