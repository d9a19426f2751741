"""--workers N: what multiplies across processes, and each worker's command line (#17 item 5)."""

from __future__ import annotations

import pytest

from proxy.policy.load import parse_policy
from proxy.workers import local_only_state, offset_address, worker_argv

BASE = """\
version: 1
providers:
  openai:
    hosts: [api.openai.com]
    auth: {type: bearer, secret: env:OPENAI_API_KEY}
"""


@pytest.mark.parametrize(
    ("extra", "top", "expected"),
    [
        ("", "", []),
        ("    limits: {requests_per_minute: 60}\n", "", ["providers.openai: limits"]),
        ("    caller_limits: {requests_per_minute: 6}\n", "", ["providers.openai: limits"]),
        ("    budget: {daily_usd: 5}\n", "", ["providers.openai: budget"]),
        ("    limits: {requests_per_minute: 60}\n", "redis: {url: redis://127.0.0.1:6379/0}\n", []),
        ("    budget: {daily_usd: 5}\n", "redis: {url: redis://127.0.0.1:6379/0}\n", []),
    ],
)
def test_local_only_state(extra: str, top: str, expected: list[str]) -> None:
    assert local_only_state(parse_policy(top + BASE + extra)) == expected


@pytest.mark.parametrize(
    ("value", "index", "expected"),
    [
        ("127.0.0.1:9090", 0, "127.0.0.1:9090"),
        ("127.0.0.1:9090", 3, "127.0.0.1:9093"),
        ("127.0.0.1:0", 3, "127.0.0.1:0"),  # each worker picks its own
        ("off", 2, "off"),
        ("[::1]:9090", 1, "[::1]:9091"),
    ],
)
def test_offset_address(value: str, index: int, expected: str) -> None:
    assert offset_address(value, index) == expected


def test_worker_argv_replaces_the_per_worker_flags_and_keeps_the_rest() -> None:
    argv = ["--policies", "p.yaml", "--listen", "127.0.0.1:0", "--workers=2", "--admin", "127.0.0.1:9090",
            "--audit", "a.jsonl", "--metrics-listen=off"]  # fmt: skip
    assert worker_argv(argv, 1, "127.0.0.1:8080", "127.0.0.1:9090", "off") == [
        "--policies", "p.yaml", "--audit", "a.w1.jsonl",
        "--listen", "127.0.0.1:8080", "--admin", "127.0.0.1:9091", "--metrics-listen", "off",
        "--reuse-port", "--worker-index", "1",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("path", "expected"),
    [("audit.jsonl", "audit.w2.jsonl"), ("/var/log/dlq", "/var/log/dlq.w2"), ("-", "-"), ("./x.d/dlq", "./x.d/dlq.w2")],
)
def test_worker_file(path: str, expected: str) -> None:
    from proxy.workers import worker_file

    assert worker_file(path, 2) == expected
