"""``sidekey check`` as CI runs it: the real CLI in a subprocess, a policy file
on disk, secrets in the environment and in files. Secret problems are named
by provider, member and source, never by value; ``--strict`` gates on them."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

from tests.integration.sidekey_process import REPO

KEY_A = "sk-check-KEYA-5150"
REDIS_URL = "redis://:sk-check-REDISPASSWORD@127.0.0.1:6379/0"
VALUES = (KEY_A, REDIS_URL, "sk-check-FILEKEY-8086", "https://hooks.example.test/sk-check-HOOK")


def check(policy: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("CHECK_", "SIDEKEY_"))}
    environ.update(env or {})
    cmd = [sys.executable, "-m", "proxy", "check", str(policy), *args]
    return subprocess.run(cmd, cwd=REPO, env=environ, capture_output=True, text=True, timeout=60, check=False)


def write_policy(tmp_path: Path) -> Path:
    """Secrets of every kind sidekey check looks at; ``unreadable`` is a
    directory, which no user (root included) can read as a file."""
    (tmp_path / "key-file").write_text(VALUES[2] + "\n")
    (tmp_path / "hook").write_text(VALUES[3] + "\n")
    (tmp_path / "unreadable").mkdir()
    policy = tmp_path / "policies.yaml"
    policy.write_text(
        f"""\
version: 1
redis: {{url: env:CHECK_REDIS_URL}}
alerts: {{webhook: file:{tmp_path / "hook"}}}
providers:
  openai:
    hosts: [api.openai.com]
    auth: {{type: bearer}}                  # no default: every member names its own
    upstreams:
      - {{name: key-a, secret: env:CHECK_KEY_A}}
      - {{name: key-b, secret: env:CHECK_KEY_B}}
      - {{name: key-c, secret: file:./key-file}}
  anthropic:
    hosts: [api.anthropic.com]
    auth: {{type: header, header: x-api-key, secret: file:./missing-key}}
  groq:
    hosts: [api.groq.com]
    auth: {{type: bearer, secret: file:./unreadable}}
  public:
    hosts: [example.com]
    auth: {{type: none}}
"""
    )
    return policy


def assert_no_values(result: subprocess.CompletedProcess[str]) -> None:
    for value in VALUES:
        assert value not in result.stdout + result.stderr, "a secret value was printed"


def test_unavailable_secrets_are_warnings_naming_provider_member_and_source(tmp_path: Path) -> None:
    policy = write_policy(tmp_path)
    result = check(policy, env={"CHECK_KEY_A": KEY_A})
    assert result.returncode == 0, result.stderr
    warnings = sorted(line for line in result.stderr.splitlines() if ": warning: " in line)
    assert warnings == sorted(
        f"{policy}: warning: {line}"
        for line in (
            "provider openai, upstream key-b: env:CHECK_KEY_B is not set",
            f"provider anthropic: file:{tmp_path / 'missing-key'} is missing",
            f"provider groq: file:{tmp_path / 'unreadable'} is unreadable (IsADirectoryError)",
            "redis.url: env:CHECK_REDIS_URL is not set",
        )
    )
    assert_no_values(result)


def test_strict_makes_them_errors_for_a_ci_gate(tmp_path: Path) -> None:
    policy = write_policy(tmp_path)
    result = check(policy, "--strict", env={"CHECK_KEY_A": KEY_A})
    assert result.returncode == 1
    assert f"{policy}: error: provider openai, upstream key-b: env:CHECK_KEY_B is not set" in result.stderr
    assert ": warning: " not in result.stderr
    assert_no_values(result)
    # Every secret readable: the same file passes the gate, and says nothing about secrets.
    (tmp_path / "missing-key").write_text("sk-check-FILEKEY-8086\n")
    (tmp_path / "unreadable").rmdir()
    (tmp_path / "unreadable").write_text("sk-check-FILEKEY-8086\n")
    env = {"CHECK_KEY_A": KEY_A, "CHECK_KEY_B": KEY_A, "CHECK_REDIS_URL": REDIS_URL}
    result = check(policy, "--strict", env=env)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_no_values(result)


def test_an_invalid_file_still_exits_2_before_any_secret_is_read(tmp_path: Path) -> None:
    policy = tmp_path / "policies.yaml"
    policy.write_text("version: 1\nproviders:\n  p:\n    hosts: [a.com]\n    auth: {type: bearer, secret: env:CHECK_X}\n"
                      "    timeout: {read: 5}\n")  # fmt: skip
    result = check(policy, "--strict")
    assert result.returncode == 2
    assert result.stderr.strip() == f"{policy}:6: providers.p.timeout: unknown field (did you mean timeouts?)"


def test_ok_line_calls_the_digest_what_it_is(tmp_path: Path) -> None:
    policy = tmp_path / "policies.yaml"
    policy.write_text("version: 1\nproviders:\n  p:\n    hosts: [a.com]\n    auth: {type: none}\n")
    digest = hashlib.sha256(policy.read_bytes()).hexdigest()[:12]
    result = check(policy)
    assert result.returncode == 0, result.stderr
    first = result.stdout.splitlines()[0]
    assert first == f"{policy}: ok, schema version 1, content digest {digest}, 1 providers, unmatched: tunnel"
