"""A real ``redis-server`` for tests: 127.0.0.1, a free port, a temp dir, no persistence.

    with RedisServer(tmp_path) as server:      # or the ``redis_server`` fixture
        server.url                             # redis://127.0.0.1:<port>/0
        server.kill(); server.start()          # down hard, then back on the same port
        server.pause(); server.resume()        # SIGSTOP / SIGCONT: a server that stops answering
        server.debug_sleep(2.0)                # DEBUG SLEEP: Redis itself busy (blocks the caller)
        server.command("CONFIG", "SET", "maxmemory", "1")   # any other command, on its own connection

Import the fixture into a test module: ``from tests.redis_server import redis_server_fixture``.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

BINARY = "redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _major_version(binary: str) -> int:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    version = out.split("v=", 1)[1].split(" ", 1)[0]  # "Redis server v=7.0.15 sha=..."
    return int(version.split(".", 1)[0])


class RedisServer:
    def __init__(self, workdir: Path, port: int = 0) -> None:
        self.workdir = workdir
        self.port = port or free_port()
        self.log_path = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 60.0) -> RedisServer:
        """Start (again) on the same port and wait until PING answers."""
        if self.proc is not None:
            raise RuntimeError("redis-server is already running")
        binary = shutil.which(BINARY)
        if binary is None:  # .ci/run installs it; a missing server is a failure, never a skip
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        cmd = [
            binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
            "--save", "", "--appendonly", "no", "--daemonize", "no", "--logfile", "",
        ]  # fmt: skip
        if _major_version(binary) >= 7:  # DEBUG is off by default from Redis 7; 6 has no such option
            cmd += ["--enable-debug-command", "local"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        self.starts += 1
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"redis-server exited at start; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer PING in {timeout}s")
            time.sleep(0.01)
        return self

    def ping(self, timeout: float = 0.5) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """Down hard (SIGKILL), as a crash would."""
        self._end(signal.SIGKILL)

    def stop(self) -> None:
        self._end(signal.SIGTERM)

    def restart(self) -> RedisServer:
        self.kill()
        return self.start()

    def pause(self) -> None:
        """The process stays and its port accepts connections, but nothing answers."""
        if self.proc is not None:
            self.proc.send_signal(signal.SIGSTOP)

    def debug_sleep(self, seconds: float) -> None:
        """``DEBUG SLEEP``: the server answers nothing for ``seconds``; returns when it is done."""
        from redis import Redis

        with Redis(host="127.0.0.1", port=self.port, socket_timeout=seconds + 10) as client:
            client.execute_command("DEBUG", "SLEEP", f"{seconds:.3f}")

    def command(self, *args: str) -> object:
        """One command on a connection of its own (CONFIG SET, ACL SETUSER, ...)."""
        from redis import Redis

        with Redis(host="127.0.0.1", port=self.port, socket_timeout=30) as client:
            return client.execute_command(*args)

    def resume(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)

    def _end(self, sig: signal.Signals) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        proc.send_signal(signal.SIGCONT)  # a paused server cannot act on SIGTERM
        proc.send_signal(sig)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "running" if self.proc is not None else "stopped"
        return f"RedisServer(port={self.port}, {state}, starts={self.starts})"


@pytest.fixture(name="redis_server")
def redis_server_fixture(tmp_path: Path) -> Iterator[RedisServer]:
    with RedisServer(tmp_path) as server:
        yield server
