"""Every start-up failure of the real ``sidekey run``: one line on stderr, a
non-zero exit, no traceback (unless asked for), nothing announced."""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from proxy.certs import CertificateAuthority
from tests.integration.sidekey_process import SidekeyProcess

MINIMAL = "version: 1\nunmatched: tunnel\n"  # no providers: no secret warnings at start
TRACEBACK = "Traceback (most recent call last):"


def run(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("SIDEKEY_")}
    cmd = [sys.executable, "-m", "proxy", *args]
    return subprocess.run(cmd, cwd=cwd, env={**base, **(env or {})}, capture_output=True, text=True, timeout=60)


def run_sidekey(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``sidekey run`` on a minimal policy; ``args`` come last and win."""
    policy = tmp_path / "policies.yaml"
    if not policy.exists():
        policy.write_text(MINIMAL)
    if not (tmp_path / "certs").exists():  # an existing CA: a first start would log "created CA" at INFO
        CertificateAuthority.load_or_create(tmp_path / "certs")
    base = ("--policies", str(policy), "--certs", str(tmp_path / "certs"), "--listen", "127.0.0.1:0")
    return run("run", *base, "--admin", "127.0.0.1:0", *args, cwd=tmp_path, env=env)


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_port_in_use(tmp_path: Path, taken_port: int) -> None:
    result = run_sidekey(tmp_path, "--listen", f"127.0.0.1:{taken_port}")
    assert one_line(result) == f"127.0.0.1:{taken_port} is in use; pick another with --listen"
    assert result.returncode == 2


def test_second_instance_whose_admin_port_is_taken_announces_nothing(tmp_path: Path, start_sidekey: object) -> None:
    first: SidekeyProcess = start_sidekey(MINIMAL, env={})  # type: ignore[operator]
    result = run_sidekey(tmp_path, "--admin", f"127.0.0.1:{first.admin_port}")
    assert one_line(result) == f"127.0.0.1:{first.admin_port} is in use; pick another with --admin"
    assert result.returncode == 2  # and no "listening" line: the one line is all there is
    ready = httpx.get(f"{first.admin_url}/readyz", trust_env=False)
    assert ready.status_code == 200  # the first one never noticed


@pytest.mark.parametrize("how", ["flag", "env"])
def test_bad_log_level_lists_the_valid_ones(tmp_path: Path, how: str) -> None:
    args, env = (("--log-level", "loud"), None) if how == "flag" else ((), {"SIDEKEY_LOG_LEVEL": "loud"})
    result = run_sidekey(tmp_path, *args, env=env)
    expected = "--log-level (or $SIDEKEY_LOG_LEVEL): expected one of DEBUG, INFO, WARNING, ERROR, CRITICAL"
    assert one_line(result) == expected
    assert result.returncode == 2


def test_ca_key_readable_by_others_names_the_chmod_that_fixes_it(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "certs")
    ca.key_path.chmod(0o644)
    result = run_sidekey(tmp_path)
    line = one_line(result)
    assert result.returncode == 2
    assert line == (f"CA key {ca.key_path} is accessible by group or others (mode 0644); run: chmod 600 {ca.key_path}")
    fix = line.split("run: ", 1)[1]
    subprocess.run(fix, shell=True, check=True, timeout=10)  # noqa: S602 - the command we told the user to run
    assert stat.S_IMODE(ca.key_path.stat().st_mode) == 0o600
    workdir = tmp_path / "after"
    workdir.mkdir()
    proc = SidekeyProcess(workdir, MINIMAL, env={})
    proc.certs = tmp_path / "certs"  # the same CA, now private
    try:
        proc.start()  # starts: the command was the whole fix
    finally:
        proc.stop()


def test_policy_that_is_a_directory(tmp_path: Path) -> None:
    folder = tmp_path / "policy-dir"
    folder.mkdir()
    result = run_sidekey(tmp_path, "--policies", str(folder))
    assert one_line(result) == f"{folder}: cannot read the policy (Is a directory)"
    assert result.returncode == 2


def test_missing_policy_named_by_the_environment(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = run("run", "--listen", "127.0.0.1:0", cwd=tmp_path, env={"SIDEKEY_POLICIES": str(missing)})
    assert one_line(result) == f"{missing}: cannot read the policy (No such file or directory)"
    assert result.returncode == 2


def test_no_policy_anywhere_points_at_init(tmp_path: Path) -> None:
    home = tmp_path / "home"  # an empty config dir; the cwd has no policies.yaml either
    result = run("run", cwd=tmp_path, env={"SIDEKEY_HOME": str(home)})
    assert one_line(result) == (
        f"no policy file: looked for ./policies.yaml and {home}/policies.yaml;"
        " create one with `sidekey init`, or pass --policies FILE"
    )
    assert result.returncode == 2


def test_bad_listen_address_is_one_line(tmp_path: Path) -> None:
    result = run_sidekey(tmp_path, "--listen", "8080")
    assert one_line(result) == (
        "sidekey run: argument --listen: expected HOST:PORT, e.g. 127.0.0.1:8080 (see sidekey run --help)"
    )
    assert result.returncode == 2


def test_bad_admin_address_is_one_line(tmp_path: Path) -> None:
    result = run_sidekey(tmp_path, "--admin", "9090")
    assert one_line(result) == "--admin: expected HOST:PORT or off, e.g. 127.0.0.1:9090"
    assert result.returncode == 2


def test_admin_on_a_public_address_without_a_token_is_one_line(tmp_path: Path) -> None:
    result = run_sidekey(tmp_path, "--admin", "0.0.0.0:0")
    assert one_line(result) == (
        "the admin listener binds 0.0.0.0 (not loopback) only with an admin token:"
        " set SIDEKEY_ADMIN_TOKEN, or use --admin 127.0.0.1:PORT"
    )
    assert result.returncode == 2


BOOM_ADDON = """\
class Boom:
    def configure(self, policy):
        raise RuntimeError("sk-live-SECRETINMESSAGE")

addons = [Boom()]
"""


def test_unexpected_failure_names_the_type_never_the_text(tmp_path: Path) -> None:
    addon = tmp_path / "boom.py"
    addon.write_text(BOOM_ADDON)
    result = run_sidekey(tmp_path, "--addon", str(addon))
    assert one_line(result) == (
        "unexpected RuntimeError; rerun with --debug-tracebacks (or SIDEKEY_DEBUG=1) to see the traceback"
    )
    assert result.returncode == 1
    assert "SECRETINMESSAGE" not in result.stderr


def test_addon_that_cannot_be_imported(tmp_path: Path) -> None:
    result = run_sidekey(tmp_path, "--addon", "no_such_sidekey_addon_module")
    assert one_line(result) == (
        "addon no_such_sidekey_addon_module: cannot load it (ModuleNotFoundError);"
        " rerun with --debug-tracebacks to see why"
    )
    assert result.returncode == 2


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_tracebacks_show_where(tmp_path: Path, taken_port: int, how: str) -> None:
    args, env = (("--debug-tracebacks",), None) if how == "flag" else ((), {"SIDEKEY_DEBUG": "1"})
    result = run_sidekey(tmp_path, "--listen", f"127.0.0.1:{taken_port}", *args, env=env)
    lines = result.stderr.splitlines()
    assert lines[0] == TRACEBACK
    assert "start_listeners" in result.stderr  # where it failed
    assert lines[-1] == f"127.0.0.1:{taken_port} is in use; pick another with --listen"
    assert result.returncode == 2


def test_debug_tracebacks_show_an_unexpected_failure_in_full(tmp_path: Path) -> None:
    addon = tmp_path / "boom.py"
    addon.write_text(BOOM_ADDON)
    result = run_sidekey(tmp_path, "--addon", str(addon), "--debug-tracebacks")
    assert TRACEBACK in result.stderr
    assert 'raise RuntimeError("sk-live-SECRETINMESSAGE")' in result.stderr  # asked for: the full story
    assert result.stderr.splitlines()[-1].startswith("unexpected RuntimeError;")
    assert result.returncode == 1


def test_run_help_shows_defaults(tmp_path: Path) -> None:
    result = run("run", "--help", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())  # argparse wraps lines
    for shown in ("(default: 127.0.0.1:8080)", "(default: 127.0.0.1:9090)", "(default: INFO)", "(default: 30.0)"):
        assert shown in text
    assert "default: ./policies.yaml, else <config dir>/policies.yaml" in text
    assert "(default: None)" not in text


@pytest.mark.parametrize(
    ("variable", "expected"),
    [("SIDEKEY_LOG_FORMAT", "--log-format (or $SIDEKEY_LOG_FORMAT): expected one of auto, text, json"),
     ("SIDEKEY_ACCESS_LOG", "--access-log (or $SIDEKEY_ACCESS_LOG): expected one of on, off")],
)  # fmt: skip
def test_a_bad_log_setting_from_the_environment_is_one_line(tmp_path: Path, variable: str, expected: str) -> None:
    result = run_sidekey(tmp_path, env={variable: "loud"})
    assert one_line(result) == expected
    assert result.returncode == 2


@pytest.mark.parametrize(
    ("name", "raw", "choices"),
    [
        ("SIDEKEY_MALLOC_TRIM_INTERVAL", "soon", "0 (off) or a number of seconds"),
        ("SIDEKEY_MALLOC_ARENA_MAX", "two", "0 (glibc's default) or a whole number"),
    ],
)
def test_bad_allocator_setting_is_named_not_quoted(tmp_path: Path, name: str, raw: str, choices: str) -> None:
    result = run_sidekey(tmp_path, env={name: raw})
    assert one_line(result) == f"${name}: expected one of {choices}"
    assert raw not in result.stderr
    assert result.returncode == 2
