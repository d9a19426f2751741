"""``sidekey init`` and running without a checkout: the real CLI in an empty
working directory, the policy and CA found in the config dir."""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from proxy.init_cmd import starter_policy
from tests.fakes.provider_thread import FakeProviderThread
from tests.integration.conftest import OPENAI_KEY, PLACEHOLDER

LISTENING = re.compile(r"sidekey listening on 127\.0\.0\.1:(\d+)")
ADMIN = re.compile(r"admin listening on 127\.0\.0\.1:(\d+)")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SIDEKEY_") and k.lower() != "https_proxy"}
    return {**env, **extra}


def sidekey(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "proxy", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_init_writes_a_private_set_up_and_says_what_next(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = sidekey("init", cwd=tmp_path, env=clean_env(SIDEKEY_HOME=str(home)))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (home / "policies.yaml").read_bytes() == starter_policy()
    key, cert = home / "certs" / "sidekey-ca-key.pem", home / "certs" / "sidekey-ca.pem"
    assert (mode(home), mode(home / "certs"), mode(key)) == (0o700, 0o700, 0o600)
    assert cert.read_text().startswith("-----BEGIN CERTIFICATE-----")
    out = result.stdout
    trust = (
        f"sidekey ca --certs {home}/certs --bundle {home}/ca-bundle.pem && export SSL_CERT_FILE={home}/ca-bundle.pem"
    )
    assert trust in out
    assert "export HTTPS_PROXY=http://127.0.0.1:8080" in out
    assert out.rstrip().splitlines()[-1].strip() == "sidekey run"  # the config dir is the default one: found by itself
    assert "ANTHROPIC_API_KEY, GROQ_API_KEY, OPENAI_API_KEY" in out

    # The trust command works as printed (sidekey on the PATH is this CLI).
    shell = (
        f'sidekey() {{ "{sys.executable}" -m proxy "$@"; }}; {trust} && test "$SSL_CERT_FILE" = {home}/ca-bundle.pem'
    )
    done = subprocess.run(
        ["bash", "-c", shell], cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert cert.read_text().strip() in (home / "ca-bundle.pem").read_text()


def test_init_into_a_named_dir_tells_run_where_it_is(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"  # given relative; the commands printed name it absolutely
    result = sidekey("init", "elsewhere", cwd=tmp_path, env=clean_env(SIDEKEY_HOME=str(tmp_path / "home")))
    assert result.returncode == 0, result.stderr
    assert result.stdout.rstrip().splitlines()[-1].strip() == f"SIDEKEY_HOME={target} sidekey run"
    assert f"sidekey ca --certs {target}/certs --bundle {target}/ca-bundle.pem" in result.stdout
    assert (target / "policies.yaml").exists() and not (tmp_path / "home").exists()


def test_init_where_it_cannot_write_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("")
    result = sidekey("init", str(tmp_path / "a-file" / "sub"), cwd=tmp_path, env=clean_env())
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"{tmp_path}/a-file/sub: cannot write (Not a directory)"]


def test_init_never_overwrites(tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = clean_env(SIDEKEY_HOME=str(home))
    assert sidekey("init", cwd=tmp_path, env=env).returncode == 0
    policy = home / "policies.yaml"
    policy.write_text("version: 1\n# my edits\n")
    key_before = (home / "certs" / "sidekey-ca-key.pem").read_bytes()

    again = sidekey("init", cwd=tmp_path, env=env)
    assert again.returncode == 2
    assert again.stderr.splitlines() == [
        f"{policy} already exists; sidekey init never overwrites (remove it, or pass another DIR)"
    ]
    assert policy.read_text() == "version: 1\n# my edits\n"
    assert (home / "certs" / "sidekey-ca-key.pem").read_bytes() == key_before

    # The CA alone is enough to refuse, and then nothing at all is written.
    policy.unlink()
    third = sidekey("init", cwd=tmp_path, env=env)
    assert third.returncode == 2
    assert third.stderr.splitlines() == [
        f"{home}/certs/sidekey-ca.pem already exists; sidekey init never overwrites (remove it, or pass another DIR)"
    ]
    assert not policy.exists()


class Running:
    """``sidekey run`` with no --policies and no --certs, as a user without a checkout runs it."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.log_path = cwd.parent / "run.log"
        cmd = [sys.executable, "-m", "proxy", "run", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        self.port = 0

    def wait_listening(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            log = self.log()
            found, admin = LISTENING.search(log), ADMIN.search(log)
            if found and admin:
                self.port = int(found.group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"sidekey exited {self.proc.returncode}:\n{log}")
            time.sleep(0.05)
        raise RuntimeError(f"sidekey did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def test_run_without_a_checkout_uses_the_config_dir(tmp_path: Path, fake: FakeProviderThread) -> None:
    home, cwd = tmp_path / "home", tmp_path / "empty"
    cwd.mkdir()
    assert sidekey("init", cwd=cwd, env=clean_env(SIDEKEY_HOME=str(home))).returncode == 0
    # The user's edit: the starter's openai provider, pointed at the (fake) upstream.
    policy = home / "policies.yaml"
    starter = policy.read_text()
    edited = starter.replace(
        "    hosts: [api.openai.com]",
        f"    hosts: [api.openai.com]\n    upstream: https://localhost:{fake.port}\n"
        f"    tls: {{ca_bundle: {fake.ca_pem_path}}}",
        1,
    )
    assert edited != starter
    policy.write_text(edited)

    running = Running(cwd, clean_env(SIDEKEY_HOME=str(home), OPENAI_API_KEY=OPENAI_KEY))
    try:
        running.wait_listening()
        ca = home / "certs" / "sidekey-ca.pem"
        curl = [
            "curl", "-sS", "--noproxy", "", "-x", f"http://127.0.0.1:{running.port}", "--cacert", str(ca),
            "-H", f"authorization: Bearer {PLACEHOLDER}", "-o", "/dev/null", "-w", "%{http_code}",
            "https://api.openai.com/echo",
        ]  # fmt: skip
        done = subprocess.run(curl, capture_output=True, text=True, timeout=30, check=False)
        assert done.stdout == "200", done.stderr  # intercepted with the config dir's CA
        assert fake.headers_seen("authorization")[-1] == f"Bearer {OPENAI_KEY}"
        log = running.log()
        found = f"policy {policy} (via the config dir, $SIDEKEY_HOME): digest "
        assert found in log and f"; CA in {home}/certs" in log.split(found, 1)[1].splitlines()[0]
        # Said before anything listens, so a reader sees it with the "listening" lines.
        assert log.index(f"policy {policy}") < log.index("sidekey listening on")
        assert list(cwd.iterdir()) == []  # no ./certs: the CA init wrote is the one served
    finally:
        running.stop()


def test_ca_command_shows_the_config_dir_ca(tmp_path: Path) -> None:
    home, cwd = tmp_path / "home", tmp_path / "empty"
    cwd.mkdir()
    env = clean_env(SIDEKEY_HOME=str(home))
    assert sidekey("init", cwd=cwd, env=env).returncode == 0
    shown = sidekey("ca", cwd=cwd, env=env)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == str(home / "certs" / "sidekey-ca.pem")
    assert list(cwd.iterdir()) == []
