"""Policy loading: typed results, and problems that name line and field but
never the value. Pure: no sockets."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from proxy.policy import CALLER_CREDENTIAL_HEADERS, Auth, SecretRef, Upstream
from proxy.policy_load import PolicyError, load_policy, parse_policy

REPO = Path(__file__).resolve().parents[2]
SECRETISH = "sk-live-SECRET123"


def problems(text: str) -> list[tuple[int, str, str]]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml", Path("/base"))
    assert SECRETISH not in str(info.value)
    return [(p.line, p.field, p.message) for p in info.value.problems]


def test_full_provider() -> None:
    policy = parse_policy(
        """\
version: 1
unmatched: deny
limits: {max_header_bytes: 32KiB, max_body_bytes: 1GB, header_timeout: 500ms, idle_timeout: 2m}
network: {allow: [169.254.169.254, "10.0.0.0/8"]}
addons: [mypkg.mod:Addon, ./local.py]
providers:
  nocodb:
    hosts: [NocoDB.Example.com., "*.nocodb.test"]
    upstream: https://db.internal:8443/api/
    auth: {type: header, header: XC-Token, prefix: "Token ", secret: file:keys/nocodb}
    set_headers: {x-client: sidekey, x-version: 2}
    strip_headers: [X-Caller-Key]
    timeouts: {connect: 2, read: 30s}
    pool: {max_connections: 7, keepalive_timeout: 15}
""",
        "p.yaml",
        Path("/base"),
    )
    assert policy.unmatched == "deny"
    assert policy.limits.max_header_bytes == 32768 and policy.limits.max_body_bytes == 10**9
    assert policy.limits.header_timeout == 0.5 and policy.limits.idle_timeout == 120
    assert policy.allow_networks == (ipaddress.ip_network("169.254.169.254/32"), ipaddress.ip_network("10.0.0.0/8"))
    assert policy.addons == ("mypkg.mod:Addon", "/base/local.py")
    (p,) = policy.providers
    assert p.hosts == ("nocodb.example.com", "*.nocodb.test")
    assert p.upstream == Upstream("db.internal", 8443, "/api")
    assert p.auth == Auth("header", SecretRef("file", "/base/keys/nocodb"), header="xc-token", prefix="Token ")
    assert p.set_headers == (("x-client", "sidekey"), ("x-version", "2"))
    assert p.strip_headers == (*CALLER_CREDENTIAL_HEADERS, "x-caller-key")
    assert (p.timeouts.connect, p.timeouts.read) == (2, 30)
    assert (p.pool.max_connections, p.pool.keepalive_timeout) == (7, 15)
    assert p.line == 7
    assert len(policy.version) == 12


@pytest.mark.parametrize(
    ("body", "line", "field", "words"),
    [
        ("  p:\n    hosts: [a.com]\n    auth: {type: bearer, secret: sk-live-SECRET123}\n", 5, "providers.p.auth.secret",
         "literal secrets"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: header, secret: env:K}\n", 5, "providers.p.auth.header", "required"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: header, header: 'x y', secret: env:K}\n", 5,
         "providers.p.auth.header", "header name"),
        ("  p:\n    hosts: [a.com]\n    upstream: http://a.com\n    auth: {type: none}\n", 5, "providers.p.upstream",
         "https"),
        ("  p:\n    hosts: [a.com]\n    upstream: https://u:sk-live-SECRET123@a.com\n    auth: {type: none}\n", 5,
         "providers.p.upstream", "user info"),
        ("  p:\n    hosts: ['https://a.com/x']\n    auth: {type: none}\n", 4, "providers.p.hosts[0]", "host name"),
        ("  p:\n    hosts: []\n    auth: {type: none}\n", 4, "providers.p.hosts", "at least one"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: magic}\n", 5, "providers.p.auth.type", "one of"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: none}\n    set_headers: {x-a: \"sk-live-SECRET123\\r\\nX: y\"}\n",
         6, "providers.p.set_headers.x-a", "control characters"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: none}\n    timeouts: {read: -3}\n", 6, "providers.p.timeouts.read",
         "duration"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: none}\n    tls: {ca_bundle: /nonexistent.pem}\n", 6,
         "providers.p.tls.ca_bundle", "not found"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: none}\n    colour: red\n", 6, "providers.p.colour", "unknown"),
        ("  P!:\n    hosts: [a.com]\n    auth: {type: none}\n", 3, "providers.P!", "lower-case"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: query, secret: env:K}\n", 5, "providers.p.auth.param", "required"),
        ("  p:\n    hosts: [a.com]\n    auth: {type: basic, secret: env:K, username: 'a:b'}\n", 5,
         "providers.p.auth.username", "':'"),
    ],
)  # fmt: skip
def test_provider_problems(body: str, line: int, field: str, words: str) -> None:
    found = problems("version: 1\nproviders:\n" + body)
    assert any(ln == line and f == field and words in m for ln, f, m in found), found


def test_duplicate_host_names_both_providers() -> None:
    found = problems(
        "version: 1\nproviders:\n  a:\n    hosts: [x.com]\n    auth: {type: none}\n"
        "  b:\n    hosts: [y.com, X.com]\n    auth: {type: none}\n"
    )
    assert found == [(7, "providers.b.hosts[1]", "host pattern is already used by provider a (line 3)")]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", (1, "(file)")),
        ("providers: {}\n", (1, "version")),
        ("version: 2\n", (1, "version")),
        ("version: 1\nunmatched: maybe\n", (2, "unmatched")),
        ("version: 1\nversion: 1\n", (2, "version")),
        ("version: 1\nlimits: {max_headers: 0}\n", (2, "limits.max_headers")),
        ("version: 1\nlimits: {max_body_bytes: lots}\n", (2, "limits.max_body_bytes")),
        ("version: 1\nnetwork: {allow: [not-an-ip]}\n", (2, "network.allow[0]")),
        ("version: 1\nproviders: [a]\n", (2, "providers")),
        ("version: 1\n  bad: [indent\n", (2, "(file)")),
        ("- 1\n", (1, "")),
    ],
)
def test_top_level_problems(text: str, expected: tuple[int, str]) -> None:
    found = problems(text)
    assert (found[0][0], found[0][1]) == expected, found


def test_error_string_format() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy("version: 1\nunmatched: maybe\n", "policies.yaml")
    assert str(info.value) == "policies.yaml:2: unmatched: expected one of: tunnel, deny"


def test_shipped_policy_loads() -> None:
    policy = load_policy(REPO / "policies.yaml")
    assert [p.name for p in policy.providers] == ["openai", "anthropic", "groq", "airtable", "nocodb", "databricks"]
    assert all(p.auth.secret is not None and p.auth.secret.kind == "env" for p in policy.providers)
    assert policy.match("api.openai.com") is policy.providers[0]
    assert policy.match("dbc-1234.cloud.databricks.com") is policy.providers[5]


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", "exact"),
        ("API.Example.com.", "exact"),
        ("a.api.example.com", "deep"),
        ("b.example.com", "wide"),
        ("x.y.example.com", "wide"),
        ("example.com", None),
        ("notexample.com", None),
    ],
)
def test_matching_precedence(host: str, expected: str | None) -> None:
    policy = parse_policy(
        "version: 1\nproviders:\n"
        "  wide: {hosts: ['*.example.com'], auth: {type: none}}\n"
        "  deep: {hosts: ['*.api.example.com'], auth: {type: none}}\n"
        "  exact: {hosts: [api.example.com], auth: {type: none}}\n"
    )
    found = policy.match(host)
    assert (found.name if found else None) == expected
