"""``sidekey run --workers N``: N processes serving one listener (SO_REUSEPORT).

One Python process tops out at one core. For a shared gateway that needs more, the parent
becomes a supervisor: it loads the CA once (so N workers never race to create it), reserves
the listen port with a bound, non-listening ``SO_REUSEPORT`` socket (so ``:0`` resolves to one
port for all), and starts N ordinary ``sidekey run`` children with ``--reuse-port`` on that
port; the kernel spreads new connections over them. Each worker keeps its own admin and
metrics listener (``--admin HOST:P`` gives worker i port P+i, ``:0`` lets each pick), so the
admin API is per worker, and says so. ``--audit``/``--dlq`` files get one file per worker
(``audit.w1.jsonl``), since two processes rotating one file would lose lines.

State that lives in a process would multiply: N workers with a local
``requests_per_minute: 60`` would admit 60·N. So the supervisor refuses to start when the
policy keeps limits, budgets or WebSocket session caps in the process (no ``redis:``), unless
``--workers 1``. A response cache in memory only lowers the hit ratio, so it is allowed.

Signals: SIGTERM/SIGINT/SIGHUP are passed to every worker (drain, reload). A worker that
exits on its own is a failure: the others are stopped and the supervisor exits with 1, so the
orchestrator restarts the whole set rather than running with fewer workers than asked.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from types import FrameType

from proxy.policy import Policy
from proxy.startup import StartupError

log = logging.getLogger("sidekey")

# Flags whose value the supervisor rewrites per worker.
_PER_WORKER = ("--listen", "--admin", "--metrics-listen", "--workers")
# Files a worker appends to and rotates on its own: one file per worker (two processes
# rotating one file would lose lines).
_PER_WORKER_FILES = ("--audit", "--dlq")


def worker_file(path: str, index: int) -> str:
    """``audit.jsonl`` -> ``audit.w1.jsonl`` for worker 1; ``-`` (stdout) unchanged."""
    if path == "-":
        return path
    head, dot, ext = path.rpartition(".")
    if not dot or "/" in ext:
        return f"{path}.w{index}"
    return f"{head}.w{index}.{ext}"


class WorkersNeedRedis(StartupError):
    template = (
        "--workers {workers}: {what} would be counted once per worker (and multiply);"
        " share them through a redis: section, or use --workers 1"
    )


def local_only_state(policy: Policy) -> list[str]:
    """What the policy counts inside one process, which N workers would multiply.
    Empty when Redis holds the shared counts (or nothing is counted)."""
    if policy.redis is not None:
        return []
    found = []
    for p in policy.providers:
        if p.limits or p.caller_limits or any(t.limits for t in p.targets):
            found.append(f"providers.{p.name}: limits")
        if p.budget is not None or p.caller_budget is not None:
            found.append(f"providers.{p.name}: budget")
        if p.websocket.max_sessions or p.websocket.caller_max_sessions:
            found.append(f"providers.{p.name}: websocket session caps")
    return found


def offset_address(value: str, index: int) -> str:
    """``HOST:P`` -> ``HOST:P+index`` (``:0`` and ``off`` unchanged): worker i's own listener."""
    if value == "off":
        return value
    host, _, port = value.rpartition(":")
    number = int(port)
    return value if number == 0 else f"{host}:{number + index}"


def worker_argv(argv: Sequence[str], index: int, listen: str, admin: str, metrics: str) -> list[str]:
    """The child's command line: the parent's ``run`` arguments without the per-worker flags,
    then this worker's listen/admin/metrics addresses and ``--reuse-port``."""
    args: list[str] = []
    skip = rename = False
    for arg in argv:
        if skip:
            skip = False
            continue
        if rename:
            args.append(worker_file(arg, index))
            rename = False
            continue
        name, eq, value = arg.partition("=")
        if name in _PER_WORKER:
            skip = not eq
            continue
        if name in _PER_WORKER_FILES:
            if eq:
                args.append(f"{name}={worker_file(value, index)}")
            else:
                args.append(arg)
                rename = True
            continue
        args.append(arg)
    return [
        *args,
        "--listen", listen,
        "--admin", offset_address(admin, index),
        "--metrics-listen", offset_address(metrics, index),
        "--reuse-port",
        "--worker-index", str(index),
    ]  # fmt: skip


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (not listen) a SO_REUSEPORT socket: it fixes the port (``0`` picks one) and keeps it
    ours while the workers bind beside it. A socket that does not listen gets no connections."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the supervisor dies (even by SIGKILL), so no
    worker outlives it holding the port."""
    import ctypes

    PR_SET_PDEATHSIG = 1  # noqa: N806 - linux/prctl.h
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def supervise(run_argv: Sequence[str], workers: int, host: str, port: int, admin: str, metrics: str) -> int:
    """Start the workers and wait; returns the exit status for ``main``."""
    reserved = reserve_port(host, port)
    port = reserved.getsockname()[1]
    listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if signum != signal.SIGHUP:
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, forward)
    for index in range(workers):
        argv = [sys.executable, "-m", "proxy", "run", *worker_argv(run_argv, index, listen, admin, metrics)]
        children.append(subprocess.Popen(argv, preexec_fn=_die_with_parent))
    log.info("supervising %d workers on %s (SO_REUSEPORT)", workers, listen)
    status = 0
    alive = {child.pid: child for child in children}
    while alive:
        pid, code = os.wait()
        child = alive.pop(pid, None)
        if child is None:
            continue
        child.returncode = os.waitstatus_to_exitcode(code)
        if not stopping:
            log.error("worker pid %d exited with %d; stopping the others", pid, child.returncode)
            stopping, status = True, 1
            for other in alive.values():
                other.send_signal(signal.SIGTERM)
        elif child.returncode not in (0, -signal.SIGTERM, -signal.SIGINT):
            status = status or 1
    reserved.close()
    return status
