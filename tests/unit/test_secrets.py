"""The one secret reader (``read_secret``) and who reads what (``secret_uses``):
the store, Redis/webhook resolution and ``sidekey check`` share them. Files
only under tmp_path; no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.policy import SecretRef
from proxy.policy.load import parse_policy
from proxy.secrets import MAX_SECRET_BYTES, SecretStore, read_secret, resolve_ref, secret_uses

SECRET = "sk-live-SECRET-4242"


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"K": SECRET}, (SECRET, None)),
        ({"K": f"  {SECRET}\n"}, (SECRET, None)),
        ({}, (None, "is not set")),
        ({"K": " \n"}, (None, "is empty")),
        ({"K": f"{SECRET}\r\nX-Injected: 1"}, (None, "contains control characters (refused: header injection)")),
        ({"K": "sk-\u2603"}, (None, "contains characters that cannot go in an HTTP header")),
    ],
)
def test_env_secrets(environ: dict[str, str], expected: tuple[str | None, str | None]) -> None:
    assert read_secret(SecretRef("env", "K"), environ) == expected


def test_file_secrets(tmp_path: Path) -> None:
    good, empty, big, folder = tmp_path / "good", tmp_path / "empty", tmp_path / "big", tmp_path / "folder"
    good.write_text(SECRET + "\n")
    empty.write_text("\n")
    big.write_text("k" * (MAX_SECRET_BYTES + 1))
    folder.mkdir()  # unreadable as a file for every user, root included
    assert read_secret(SecretRef("file", str(good))) == (SECRET, None)
    assert read_secret(SecretRef("file", str(empty))) == (None, "is empty")
    assert read_secret(SecretRef("file", str(big))) == (None, "is too large to be a credential")
    assert read_secret(SecretRef("file", str(tmp_path / "gone"))) == (None, "is missing")
    assert read_secret(SecretRef("file", str(folder))) == (None, "is unreadable (IsADirectoryError)")


def test_store_and_resolve_ref_agree_with_read_secret(tmp_path: Path) -> None:
    """One reader: a value the store refuses is refused for a Redis URL too."""
    path = tmp_path / "url"
    path.write_text("redis://127.0.0.1:6379/0\r\nQUIT\n")
    ref = SecretRef("file", str(path))
    store = SecretStore({})
    store.watch([ref])
    store.refresh()
    assert store.get(ref) is None and store.problem(ref) == read_secret(ref)[1]
    assert resolve_ref(ref) is None
    path.write_text("redis://127.0.0.1:6379/0\n")
    assert store.refresh() == [ref] and store.get(ref) == resolve_ref(ref) == "redis://127.0.0.1:6379/0"
    assert resolve_ref("redis://as-written") == "redis://as-written"


def test_secret_uses_names_who_reads_each_secret() -> None:
    text = """\
version: 1
redis: {url: env:REDIS_URL}
alerts: {webhook: env:HOOK}
providers:
  pooled:
    hosts: [a.com]
    auth: {type: bearer, secret: env:DEFAULT}
    upstreams:
      - {name: a}
      - {name: b}
      - {name: c, secret: env:KEY_C}
  own:
    hosts: [b.com]
    auth: {type: header, header: x-k}
    upstreams: [{name: x, secret: env:KEY_X}, {name: y, secret: env:KEY_Y}]
  unused-default:
    hosts: [c.com]
    auth: {type: bearer, secret: env:NEVER_READ}
    upstreams: [{name: only, secret: env:KEY_ONLY}]
  open:
    hosts: [d.com]
    auth: {type: none}
"""
    uses = [(who, ref.source) for who, ref in secret_uses(parse_policy(text))]
    assert uses == [
        ("provider pooled", "env:DEFAULT"),  # once, though two members use it
        ("provider pooled, upstream c", "env:KEY_C"),
        ("provider own, upstream x", "env:KEY_X"),
        ("provider own, upstream y", "env:KEY_Y"),
        ("provider unused-default, upstream only", "env:KEY_ONLY"),
        ("redis.url", "env:REDIS_URL"),
        ("alerts.webhook", "env:HOOK"),
    ]


def test_plain_redis_url_and_webhook_are_not_secrets() -> None:
    text = "version: 1\nredis: {url: 'redis://127.0.0.1:6379/0'}\nalerts: {webhook: 'https://hooks.example.test/x'}\n"
    assert list(secret_uses(parse_policy(text))) == []
