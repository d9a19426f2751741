"""Fixtures: a fake provider over TLS and a real sidekey process in front of it.

Clients are configured the way apps are: HTTPS_PROXY, a CA bundle, and a
placeholder key. Provider host names (api.openai.com, ...) never leave the
machine: the policy points their upstream at the fake on 127.0.0.1.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.sidekey_process import SidekeyProcess

OPENAI_KEY = "sk-proj-REALOPENAI-7f3a9c1e5b"
ANTHROPIC_KEY = "sk-ant-REALANTHROPIC-2d8e4f6a"
QUERY_KEY = "AIzaREALQUERYKEY-91b7"
PLACEHOLDER = "sk-placeholder-not-a-key"
SECRETS = (OPENAI_KEY, ANTHROPIC_KEY, QUERY_KEY)
SECRET_ENV = {"OPENAI_API_KEY": OPENAI_KEY, "ANTHROPIC_API_KEY": ANTHROPIC_KEY, "QUERY_API_KEY": QUERY_KEY}


def policy_for(fake: FakeProviderThread, *, unmatched: str = "tunnel", extra: str = "", limits: str = "") -> str:
    upstream = f"https://localhost:{fake.port}"
    tls = f"tls: {{ca_bundle: {fake.ca_pem_path}}}"
    return f"""\
version: 1
unmatched: {unmatched}
{limits}
providers:
  openai:
    hosts: [api.openai.com]
    upstream: {upstream}
    auth: {{type: bearer, secret: env:OPENAI_API_KEY}}
    {tls}
    timeouts: {{connect: 5, read: 5}}
    retry: {{attempts: 1}}  # failure tests see each failure once; see retrying below
  anthropic:
    hosts: [api.anthropic.com]
    upstream: {upstream}
    auth: {{type: header, header: x-api-key, secret: env:ANTHROPIC_API_KEY}}
    set_headers: {{anthropic-version: "2023-06-01"}}
    {tls}
    retry: {{attempts: 1}}
  querykey:
    hosts: ["*.query.test"]
    upstream: {upstream}
    auth: {{type: query, param: key, secret: env:QUERY_API_KEY}}
    {tls}
    retry: {{attempts: 1}}
  retrying:
    hosts: [retry.test]
    upstream: {upstream}
    auth: {{type: bearer, secret: env:OPENAI_API_KEY}}
    {tls}
    timeouts: {{connect: 5, read: 5}}
    retry: {{attempts: 3, backoff_base: 10ms, backoff_cap: 50ms, deadline: 10s}}
{extra}
"""


BEARER = "{type: bearer, secret: env:OPENAI_API_KEY}"
DOWN = "https://127.0.0.1:9"  # the discard port: nothing listens, connects are refused


def extra_provider(name: str, host: str, upstream: str, *, auth: str = BEARER, **fields: str) -> str:
    """One more provider for ``policy_for(extra=...)``; ``fields`` are YAML flow values."""
    lines = [f"  {name}:", f"    hosts: [{host}]", f"    upstream: {upstream}", f"    auth: {auth}"]
    lines += [f"    {key}: {value}" for key, value in fields.items()]
    return "\n".join(lines) + "\n"


def fake_provider(fake: FakeProviderThread, name: str, host: str, **fields: str) -> str:
    """A provider whose upstream is the fake, trusted through its own CA."""
    tls = f"{{ca_bundle: {fake.ca_pem_path}}}"
    return extra_provider(name, host, f"https://localhost:{fake.port}", tls=tls, **fields)


@pytest.fixture
def fake() -> Iterator[FakeProviderThread]:
    with FakeProviderThread() as provider:
        yield provider


@pytest.fixture
def start_sidekey(tmp_path: Path, fake: FakeProviderThread) -> Iterator[object]:
    """Starts sidekey processes and stops them after the test. It asks for ``fake``
    only so that pytest tears the processes down *before* the fake provider: a
    sidekey still running when the fake closes may open a connection the fake
    never sees finish its TLS handshake, and its socket is then reported
    unclosed (a ResourceWarning, an error here) in whichever test runs next."""
    del fake
    started: list[SidekeyProcess] = []

    def start(policy: str, *, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> SidekeyProcess:
        workdir = tmp_path / f"sidekey{len(started)}"
        workdir.mkdir()
        proc = SidekeyProcess(workdir, policy, env=SECRET_ENV if env is None else env, args=args)
        started.append(proc)
        return proc.start()

    yield start
    for proc in started:
        proc.stop()


@pytest.fixture
def sidekey(start_sidekey: object, fake: FakeProviderThread) -> SidekeyProcess:
    return start_sidekey(policy_for(fake))  # type: ignore[operator, no-any-return]


@pytest.fixture
def client_env(sidekey: SidekeyProcess, monkeypatch: pytest.MonkeyPatch) -> SidekeyProcess:
    """The process environment an app gets: HTTPS_PROXY + trust in sidekey's CA."""
    monkeypatch.setenv("HTTPS_PROXY", sidekey.url)
    monkeypatch.setenv("HTTP_PROXY", sidekey.url)
    monkeypatch.setenv("SSL_CERT_FILE", str(sidekey.ca_path))
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    return sidekey


def curl(proxy: SidekeyProcess, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    cmd = ["curl", "-sS", "--suppress-connect-headers", "--noproxy", "", "-x", proxy.url]
    cmd += ["--cacert", str(proxy.ca_path)]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, errors="replace", timeout=timeout, check=False)


def assert_no_secret(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, "a secret leaked"
