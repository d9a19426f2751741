"""Run the real ``sidekey`` CLI as a subprocess for integration tests.

The process listens on 127.0.0.1:0; we read the bound port from its log. All
of its stderr (at DEBUG) is kept in a file so tests can sweep it for secrets.

Start-up is waited for by polling that log for the "listening" lines, with a
generous deadline: on a loaded machine (load average 20-50 on 2 cores) the
interpreter start, imports and CA load alone took more than 20 s. A process
that exits early is reported at once, not at the deadline.
"""

from __future__ import annotations

import os
import re
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
_LISTENING = re.compile(r"sidekey listening on 127\.0\.0\.1:(\d+)")
_ADMIN = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")
START_TIMEOUT = 120.0  # seconds; loaded runs took over 20 s, an idle start takes a small part of that


class SidekeyProcess:
    def __init__(
        self,
        workdir: Path,
        policy_yaml: str,
        *,
        env: Mapping[str, str] = (),  # type: ignore[assignment]
        args: tuple[str, ...] = (),
        log_level: str = "DEBUG",
        preexec: Callable[[], None] | None = None,
    ) -> None:
        self.workdir = workdir
        self.policy_path = workdir / "policies.yaml"
        self.policy_path.write_text(policy_yaml)
        self.certs = workdir / "certs"
        self.log_path = workdir / "sidekey.log"
        # Pod mode (the admin token required on loopback) only where a test asks for it.
        inherited = {k: v for k, v in os.environ.items() if k != "KUBERNETES_SERVICE_HOST"}
        self.env = {**inherited, **dict(env)}
        self.env.pop("HTTPS_PROXY", None)
        self.env.pop("https_proxy", None)
        self.args = args
        self.log_level = log_level
        self.preexec = preexec  # runs in the child before exec (e.g. setrlimit)
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.admin_port = 0

    def start(self, timeout: float = START_TIMEOUT) -> SidekeyProcess:
        cmd = [
            sys.executable, "-m", "proxy", "run",
            "--listen", "127.0.0.1:0",
            "--policies", str(self.policy_path),
            "--certs", str(self.certs),
            "--log-level", self.log_level,
            "--log-format", "text",  # tests read the text lines; test_logs passes json after it
            "--admin", "127.0.0.1:0",
            *self.args,
        ]  # fmt: skip
        out = open(self.log_path, "wb")  # noqa: SIM115 - owned by the process lifetime
        self.proc = subprocess.Popen(  # preexec only sets limits in the child
            cmd, cwd=REPO, env=self.env, stdout=out, stderr=subprocess.STDOUT, preexec_fn=self.preexec
        )
        out.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            match, admin = _LISTENING.search(log), _ADMIN.search(log)
            if match and admin:
                self.port, self.admin_port = int(match.group(1)), int(admin.group(1))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidekey exited {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"sidekey did not start in {timeout:.0f} s:\n{self.log()}")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def ca_path(self) -> Path:
        return self.certs / "sidekey-ca.pem"

    def client_ssl_context(self) -> ssl.SSLContext:
        """What an app trusting sidekey's CA uses."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def rss_peak_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
        raise RuntimeError("no VmHWM")

    def terminate(self, wait: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(wait)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
