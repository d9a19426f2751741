"""Policy loading: typed results, and problems that name the line and field
but never the value. Pure: no sockets, files only under tmp_path."""

from __future__ import annotations

import hashlib
import ipaddress
import os
from pathlib import Path

import pytest

from proxy.policy import (
    CALLER_CREDENTIAL_HEADERS,
    Auth,
    ListenerLimits,
    PoolLimits,
    SecretRef,
    Timeouts,
    Upstream,
    UpstreamTLS,
)
from proxy.policy.fields import parse_duration, parse_size
from proxy.policy.load import PolicyError, PolicyProblem, load_policy, parse_policy

REPO = Path(__file__).resolve().parents[2]
BASE = Path("/base")
SECRET = "sk-live-SECRET123"


def provider(*lines: str) -> str:
    """A policy whose one provider ``p`` is on line 3; ``lines`` start at line 4."""
    return "version: 1\nproviders:\n  p:\n" + "".join(f"    {line}\n" for line in lines)


def problems(text: str | bytes) -> list[PolicyProblem]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml", BASE)
    assert SECRET not in str(info.value)
    assert all(SECRET not in p.field and SECRET not in p.message for p in info.value.problems)
    return list(info.value.problems)


def assert_problem(text: str | bytes, line: int, field: str, words: str) -> None:
    found = problems(text)
    assert any(p.line == line and p.field == field and words in p.message for p in found), found


# -- good input --------------------------------------------------------------------


def test_full_policy(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not parsed by the loader\n")
    text = """\
version: 1
unmatched: deny
limits: {max_header_bytes: 32KiB, max_headers: 50, max_body_bytes: 1GB, header_timeout: 500ms, idle_timeout: 2m, body_timeout: 5}
network: {allow: [169.254.169.254, "10.1.2.3/8", "fd00::/8"]}
addons: [mypkg.mod:Addon, mypkg.other, ./local.py, "/opt/x.py:Cls", "sub/y.py"]
providers:
  nocodb:
    hosts: [NocoDB.Example.com., "*.nocodb.test"]
    upstream: https://DB.internal:8443/api/
    auth: {type: header, header: XC-Token, prefix: "Token ", secret: file:keys/nocodb}
    set_headers: {X-Client: sidekey, x-version: 2.50, x-flag: true}
    strip_headers: [X-Caller-Key, authorization]
    timeouts: {connect: 2, read: 30s}
    tls: {ca_bundle: ./ca.pem, server_name: Internal.Example.}
    pool: {max_connections: 7, keepalive_timeout: 15}
"""
    policy = parse_policy(text, "p.yaml", tmp_path)
    assert policy.unmatched == "deny"
    assert policy.limits == ListenerLimits(32768, 50, 10**9, 0.5, 120.0, 5.0)
    assert policy.allow_networks == (
        ipaddress.ip_network("169.254.169.254/32"),
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("fd00::/8"),
    )
    assert policy.addons == (
        "mypkg.mod:Addon",
        "mypkg.other",
        str(tmp_path / "local.py"),
        "/opt/x.py:Cls",
        str(tmp_path / "sub" / "y.py"),
    )
    (p,) = policy.providers
    assert p.name == "nocodb" and p.line == 7
    assert p.hosts == ("nocodb.example.com", "*.nocodb.test")
    assert p.upstream == Upstream("db.internal", 8443, "/api")
    secret = SecretRef("file", str(tmp_path / "keys" / "nocodb"))
    assert p.auth == Auth("header", secret, header="xc-token", prefix="Token ")
    assert p.set_headers == (("x-client", "sidekey"), ("x-version", "2.50"), ("x-flag", "true"))
    assert p.strip_headers == (*CALLER_CREDENTIAL_HEADERS, "x-caller-key")
    assert p.timeouts == Timeouts(connect=2.0, read=30.0)
    assert p.tls == UpstreamTLS(ca_bundle=str(tmp_path / "ca.pem"), server_name="internal.example")
    assert p.pool == PoolLimits(max_connections=7, keepalive_timeout=15.0)
    assert policy.source == "p.yaml"
    assert policy.digest == hashlib.sha256(text.encode()).hexdigest()[:12]


def test_minimal_policy_has_defaults() -> None:
    policy = parse_policy("version: 1\n")
    assert policy.providers == () and policy.unmatched == "tunnel"
    assert policy.limits == ListenerLimits() and policy.allow_networks == () and policy.addons == ()
    assert policy.source == "<memory>" and len(policy.digest) == 12


def test_minimal_provider_has_defaults() -> None:
    (p,) = parse_policy(provider("hosts: [a.com]", "auth: {type: bearer, secret: env:KEY}")).providers
    assert p.upstream is None and p.set_headers == ()
    assert p.auth == Auth("bearer", SecretRef("env", "KEY"))
    assert p.strip_headers == CALLER_CREDENTIAL_HEADERS
    assert (p.timeouts, p.tls, p.pool, p.line) == (Timeouts(), UpstreamTLS(), PoolLimits(), 3)


def test_empty_sections_mean_defaults() -> None:
    text = "version: 1\nlimits:\nnetwork:\naddons:\nproviders:\n"
    policy = parse_policy(text)
    assert (policy.providers, policy.limits, policy.allow_networks, policy.addons) == ((), ListenerLimits(), (), ())
    policy = parse_policy(provider("hosts: [a.com]", "auth: {type: none}", "upstream: null", "tls: {server_name: ~}"))
    assert policy.providers[0].upstream is None and policy.providers[0].tls == UpstreamTLS()


@pytest.mark.parametrize(
    ("auth", "expected"),
    [
        ("{type: bearer, secret: env:K}", Auth("bearer", SecretRef("env", "K"))),
        ("{type: header, header: X-Api-Key, secret: env:K}", Auth("header", SecretRef("env", "K"), header="x-api-key")),
        ("{type: basic, username: svc, secret: env:K}", Auth("basic", SecretRef("env", "K"), username="svc")),
        ("{type: query, param: api_key, secret: env:K}", Auth("query", SecretRef("env", "K"), param="api_key")),
        ("{type: none}", Auth("none", None)),
        ("{type: bearer, secret: file:/run/key}", Auth("bearer", SecretRef("file", "/run/key"))),
        ("{type: bearer, secret: file:key}", Auth("bearer", SecretRef("file", "/base/key"))),
    ],
)
def test_auth_types(auth: str, expected: Auth) -> None:
    (p,) = parse_policy(provider("hosts: [a.com]", f"auth: {auth}"), base_dir=BASE).providers
    assert p.auth == expected


def test_header_auth_is_stripped_too() -> None:
    text = provider(
        "hosts: [a.com]", "auth: {type: header, header: X-Custom, secret: env:K}", "strip_headers: [x-a, X-A]"
    )
    (p,) = parse_policy(text).providers
    assert p.strip_headers == (*CALLER_CREDENTIAL_HEADERS, "x-a", "x-custom")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("https://api.openai.com", Upstream("api.openai.com", 443, "")),
        ("https://api.openai.com/", Upstream("api.openai.com", 443, "")),
        ("HTTPS://API.Example.com:8443/v1prefix/", Upstream("api.example.com", 8443, "/v1prefix")),
        ("https://[::1]:8443/a/b", Upstream("::1", 8443, "/a/b")),
        ("https://10.0.0.5", Upstream("10.0.0.5", 443, "")),
    ],
)
def test_upstream(url: str, expected: Upstream) -> None:
    (p,) = parse_policy(provider("hosts: [a.com]", "auth: {type: none}", f"upstream: '{url}'")).providers
    assert p.upstream == expected


def test_hosts_are_normalized() -> None:
    text = provider("hosts: [API.Example.COM., '*.Example.org', '[::1]', 10.0.0.1, bücher.de]", "auth: {type: none}")
    (p,) = parse_policy(text).providers
    assert p.hosts == ("api.example.com", "*.example.org", "::1", "10.0.0.1", "xn--bcher-kva.de")


def test_anchors_without_aliases_are_fine() -> None:
    assert parse_policy(provider("hosts: &h [a.com]", "auth: {type: none}")).providers[0].hosts == ("a.com",)


# -- sizes and durations -------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("65536", 65536),
        ("65_536", 65536),
        ("64KiB", 65536),
        ("1MiB", 2**20),
        ("2GiB", 2 * 2**30),
        ("500KB", 500_000),
        ("10 MB", 10**7),
        ("1.5KiB", 1536),
        ("7B", 7),
        ("0", None),
        ("0B", None),
        ("0.0001KB", None),
        ("-1", None),
        ("lots", None),
        ("KiB", None),
        ("64 KiBs", None),
        ("", None),
    ],
)
def test_parse_size(text: str, expected: int | None) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10", 10.0),
        ("2.5", 2.5),
        (".5", 0.5),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("0", None),
        ("0s", None),
        ("-1", None),
        ("10 sec", None),
        ("1d", None),
        ("soon", None),
        ("", None),
    ],
)
def test_parse_duration(text: str, expected: float | None) -> None:
    assert parse_duration(text) == expected


def test_sizes_and_durations_through_limits() -> None:
    text = (
        "version: 1\nlimits: {max_header_bytes: 1MiB, max_body_bytes: 500KB, idle_timeout: 1.5, body_timeout: 250ms}\n"
    )
    limits = parse_policy(text).limits
    assert (limits.max_header_bytes, limits.max_body_bytes) == (2**20, 500_000)
    assert (limits.idle_timeout, limits.body_timeout, limits.header_timeout) == (1.5, 0.25, 10.0)


# -- bad input: exact line and field, never the value --------------------------------

A = "hosts: [a.com]"
NONE = "auth: {type: none}"


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        # auth
        (provider(A, f"auth: {{type: bearer, secret: {SECRET}}}"), 5, "providers.p.auth.secret", "expected env:NAME or file:PATH; literal secrets are not allowed"),
        (provider(A, f"auth: {{type: bearer, secret: 'Bearer {SECRET}'}}"), 5, "providers.p.auth.secret", "literal secrets"),
        (provider(A, "auth: {type: bearer, secret: env:1BAD}"), 5, "providers.p.auth.secret", "literal secrets"),
        (provider(A, "auth: {type: bearer, secret: 'file:'}"), 5, "providers.p.auth.secret", "literal secrets"),
        (provider(A, f"auth: {{type: bearer, secret: {{value: {SECRET}}}}}"), 5, "providers.p.auth.secret", "env:NAME or file:PATH"),
        (provider(A, "auth: {type: bearer}"), 5, "providers.p.auth.secret", "required"),
        (provider(A, f"auth: {{type: magic, secret: {SECRET}}}"), 5, "providers.p.auth.type", "expected one of: bearer, header, basic, query, oauth2, aws-sigv4, none"),
        (provider(A, f"auth: {{secret: {SECRET}}}"), 5, "providers.p.auth.secret", "literal secrets"),
        (provider(A, "auth: {secret: env:K}"), 5, "providers.p.auth.type", "required"),
        (provider(A, "auth: {type: header, secret: env:K}"), 5, "providers.p.auth.header", "required for type header"),
        (provider(A, "auth: {type: header, header: 'x y', secret: env:K}"), 5, "providers.p.auth.header", "expected a header name"),
        (provider(A, "auth: {type: header, header: content-length, secret: env:K}"), 5, "providers.p.auth.header", "does not manage"),
        (provider(A, f'auth: {{type: header, header: x-k, prefix: "{SECRET}\\r\\n", secret: env:K}}'), 5, "providers.p.auth.prefix", "control characters"),
        (provider(A, "auth: {type: basic, secret: env:K}"), 5, "providers.p.auth.username", "required for type basic"),
        (provider(A, f"auth: {{type: basic, secret: env:K, username: 'u:{SECRET}'}}"), 5, "providers.p.auth.username", "must not contain ':'"),
        (provider(A, "auth: {type: query, secret: env:K}"), 5, "providers.p.auth.param", "required for type query"),
        (provider(A, f"auth: {{type: query, secret: env:K, param: '{SECRET}&x=1'}}"), 5, "providers.p.auth.param", "query parameter name"),
        (provider(A, "auth: {type: bearer, header: x-k, secret: env:K}"), 5, "providers.p.auth.header", "does not apply to type bearer"),
        (provider(A, "auth: {type: none, secret: env:K}"), 5, "providers.p.auth.secret", "does not apply to type none"),
        (provider(A, f"auth: {{type: none, colour: {SECRET}}}"), 5, "providers.p.auth.colour", "unknown field"),
        (provider(A, "auth: bearer"), 5, "providers.p.auth", "expected a mapping"),
        (provider(A), 3, "providers.p.auth", "required"),
        # hosts
        (provider(NONE), 3, "providers.p.hosts", "required"),
        (provider("hosts: []", NONE), 4, "providers.p.hosts", "at least one host"),
        (provider("hosts: a.com", NONE), 4, "providers.p.hosts", "expected a list"),
        (provider("hosts: ['https://a.com/x']", NONE), 4, "providers.p.hosts[0]", "no scheme, port or path"),
        (provider("hosts: [a.com, 'a.com:443']", NONE), 4, "providers.p.hosts[1]", "expected a host name"),
        (provider("hosts: ['*']", NONE), 4, "providers.p.hosts[0]", "expected a host name"),
        (provider("hosts: ['a..com']", NONE), 4, "providers.p.hosts[0]", "expected a host name"),
        (provider("hosts: ['*.10.0.0.1']", NONE), 4, "providers.p.hosts[0]", "expected a host name"),
        (provider("hosts:", "  - a.com", "  - [b.com]", NONE), 6, "providers.p.hosts[1]", "expected a host name"),
        (provider("hosts: [a.com, A.com.]", NONE), 4, "providers.p.hosts[1]", "duplicate host pattern (first at line 4)"),
        # upstream
        (provider(A, NONE, "upstream: http://a.com"), 6, "providers.p.upstream", "must be https: credentials are never sent over plaintext"),
        (provider(A, NONE, f"upstream: http://{SECRET}.com"), 6, "providers.p.upstream", "must be https"),
        (provider(A, NONE, f"upstream: 'https://u:{SECRET}@a.com'"), 6, "providers.p.upstream", "user info"),
        (provider(A, NONE, f"upstream: 'https://a.com/v1?key={SECRET}'"), 6, "providers.p.upstream", "query or fragment"),
        (provider(A, NONE, "upstream: 'https://a.com/v1#x'"), 6, "providers.p.upstream", "query or fragment"),
        (provider(A, NONE, "upstream: api.openai.com"), 6, "providers.p.upstream", "expected a URL like"),
        (provider(A, NONE, "upstream: 'https://a.com:99999'"), 6, "providers.p.upstream", "expected a URL like"),
        (provider(A, NONE, "upstream: 'https://a.com:0'"), 6, "providers.p.upstream", "expected a URL like"),
        (provider(A, NONE, "upstream: 'https://*.a.com'"), 6, "providers.p.upstream", "expected a URL like"),
        (provider(A, NONE, "upstream: 'https://a.com/a b'"), 6, "providers.p.upstream", "expected a URL like"),
        # set_headers / strip_headers
        (provider(A, NONE, f'set_headers: {{x-a: "{SECRET}\\r\\nX: y"}}'), 6, "providers.p.set_headers.x-a", "control characters"),
        (provider(A, NONE, f'set_headers: {{x-a: "{SECRET}\\u0000"}}'), 6, "providers.p.set_headers.x-a", "control characters"),
        (provider(A, NONE, "set_headers:", f"  x-a: '{SECRET}'", f"  x-b: [{SECRET}]"), 8, "providers.p.set_headers.x-b", "expected a string"),
        (provider(A, NONE, f"set_headers: {{Authorization: 'Bearer {SECRET}'}}"), 6, "providers.p.set_headers.Authorization", "credentials belong in auth.secret"),
        (provider(A, NONE, f"set_headers: {{'Authorization: Bearer {SECRET}': x}}"), 6, "providers.p.set_headers[0]", "expected a header name"),
        (provider(A, NONE, "set_headers: {host: a.com}"), 6, "providers.p.set_headers.host", "managed by the proxy"),
        (provider(A, NONE, "set_headers:", "  X-A: 1", "  x-a: 2"), 8, "providers.p.set_headers.x-a", "duplicate header (first at line 7)"),
        (provider(A, NONE, "set_headers: [x-a]"), 6, "providers.p.set_headers", "expected a mapping"),
        (provider(A, NONE, "strip_headers: [content-length]"), 6, "providers.p.strip_headers[0]", "cannot be stripped"),
        (provider(A, NONE, "strip_headers: ['x y']"), 6, "providers.p.strip_headers[0]", "expected a header name"),
        # timeouts, tls, pool
        (provider(A, NONE, "timeouts: {read: -3}"), 6, "providers.p.timeouts.read", "expected a duration > 0"),
        (provider(A, NONE, "timeouts: {connect: 0}"), 6, "providers.p.timeouts.connect", "expected a duration > 0"),
        (provider(A, NONE, "timeouts: {connect: soon}"), 6, "providers.p.timeouts.connect", "expected a duration"),
        (provider(A, NONE, "timeouts: {write: 1}"), 6, "providers.p.timeouts.write", "unknown field (expected one of: connect, read)"),
        # a near miss names the field meant: a name from the schema, never the value
        (provider(A, NONE, f"timeout: {{read: {SECRET}}}"), 6, "providers.p.timeout", "unknown field (did you mean timeouts?)"),
        (provider(A, NONE, "timeouts: {conect: 1}"), 6, "providers.p.timeouts.conect", "unknown field (did you mean connect?)"),
        (provider(A, "auth: {type: bearer, secrets: env:K}"), 5, "providers.p.auth.secrets", "unknown field (did you mean secret?)"),
        (provider(A, NONE, "upstreams: [{name: a, sekret: env:K}]"), 6, "providers.p.upstreams[0].sekret", "unknown field (did you mean secret?)"),
        (provider(A, NONE, "limits: {requests_per_minutes: 5}"), 6, "providers.p.limits.requests_per_minutes", "unknown field (did you mean requests_per_minute?)"),
        (provider(A, NONE, "retry: {attempt: 2}"), 6, "providers.p.retry.attempt", "unknown field (did you mean attempts?)"),
        (provider(A, NONE, "tls: {ca_bundle: /nonexistent/ca.pem}"), 6, "providers.p.tls.ca_bundle", "file not found: /nonexistent/ca.pem"),
        (provider(A, NONE, "tls: {server_name: 'a b'}"), 6, "providers.p.tls.server_name", "expected a host name"),
        (provider(A, NONE, "pool: {max_connections: 0}"), 6, "providers.p.pool.max_connections", "expected a whole number >= 1"),
        (provider(A, NONE, "pool: {max_connections: 1.5}"), 6, "providers.p.pool.max_connections", "whole number"),
        (provider(A, NONE, "pool: {keepalive_timeout: 0s}"), 6, "providers.p.pool.keepalive_timeout", "duration > 0"),
        (provider(A, NONE, "pool: {keepalive_timeout: 0.0}"), 6, "providers.p.pool.keepalive_timeout", "duration > 0"),
        # queue_wait alone may be 0 (answer at once); below that it is refused like the rest
        (provider(A, NONE, "queue_wait: -1"), 6, "providers.p.queue_wait", "expected a duration >= 0 in seconds"),
        (provider(A, NONE, f"queue_wait: {SECRET}"), 6, "providers.p.queue_wait", "expected a duration >= 0"),
        # the provider itself
        (provider(A, NONE, f"colour: {SECRET}"), 6, "providers.p.colour", "unknown field (expected one of: auth, balance, budget, cache, caller_budget, caller_limits, circuit, fallbacks, health_check, hosts, limits, placeholders, pool, queue_wait, retry, set_headers, sse_error_event, strip_headers, timeouts, tls, upstream, upstreams, websocket, websocket_idle_timeout, websocket_max_duration, websocket_usage)"),
        (provider(A, NONE, "hosts: [b.com]"), 6, "providers.p.hosts", "duplicate key (first at line 4)"),
        ("version: 1\nproviders:\n  Upper:\n    hosts: [a.com]\n    auth: {type: none}\n", 3, "providers.Upper", "expected a name of a-z, 0-9"),
        ("version: 1\nproviders:\n  P!:\n    hosts: [a.com]\n    auth: {type: none}\n", 3, "providers[0]", "expected a name of a-z, 0-9"),
        ("version: 1\nproviders:\n  p: [a.com]\n", 3, "providers.p", "expected a mapping"),
        ("version: 1\nproviders:\n  p: &x {hosts: [a.com], auth: {type: none}}\n  q: *x\n", 4, "providers.q", "YAML aliases"),
        (provider("hosts: &h [a.com]", NONE, "auth2: *h"), 6, "providers.p.auth2", "unknown field"),
    ],
)  # fmt: skip
def test_provider_problems(text: str, line: int, field: str, words: str) -> None:
    assert_problem(text, line, field, words)


@pytest.mark.parametrize(
    ("text", "line", "field", "words"),
    [
        ("", 1, "(file)", "empty policy"),
        ("# only a comment\n", 1, "(file)", "empty policy"),
        ("- 1\n", 1, "(file)", "expected a mapping at the top level"),
        (f"{SECRET}\n", 1, "(file)", "expected a mapping at the top level"),
        ("providers: {}\n", 1, "version", "required (version: 1)"),
        ("version: 2\n", 1, "version", "unsupported version (expected 1)"),
        ("version: '1'\n", 1, "version", "expected a whole number"),
        (f"version: {SECRET}\n", 1, "version", "expected a whole number"),
        ("version: 1\nversion: 1\n", 2, "version", "duplicate key (first at line 1)"),
        ("version: 1\nunmatched: maybe\n", 2, "unmatched", "expected one of: tunnel, deny"),
        (f"version: 1\ncolour: {SECRET}\n", 2, "colour", "unknown field (expected one of: addons, alerts, callers,"),
        ("version: 1\nprovider: {}\n", 2, "provider", "unknown field (did you mean providers?)"),
        ("version: 1\nlimits: {idle_timeot: 5}\n", 2, "limits.idle_timeot", "(did you mean idle_timeout?)"),
        ("version: 1\nlimits: {max_headers: 0}\n", 2, "limits.max_headers", "expected a whole number >= 1"),
        (f"version: 1\nlimits: {{max_body_bytes: {SECRET}}}\n", 2, "limits.max_body_bytes", "expected a size"),
        ("version: 1\nlimits:\n  header_timeout: -1\n", 3, "limits.header_timeout", "expected a duration > 0"),
        ("version: 1\nlimits: {max_cats: 1}\n", 2, "limits.max_cats", "unknown field"),
        (f"version: 1\nnetwork: {{allow: [{SECRET}]}}\n", 2, "network.allow[0]", "expected an IP address or CIDR"),
        ("version: 1\nnetwork: [10.0.0.1]\n", 2, "network", "expected a mapping"),
        ("version: 1\nnetwork: {allow: 10.0.0.1}\n", 2, "network.allow", "expected a list"),
        (
            f"version: 1\naddons: ['{SECRET} x']\n",
            2,
            "addons[0]",
            "expected pkg.module[:Class] or a path ending in .py[:Class]",
        ),
        ("version: 1\naddons: mypkg\n", 2, "addons", "expected a list"),
        ("version: 1\nproviders: [a]\n", 2, "providers", "expected a mapping"),
        ("version: 1\n  bad: [indent\n", 2, "(file)", "not valid YAML"),
        (f'version: 1\nkey: "{SECRET}\n', 3, "(file)", "not valid YAML"),
        (f"version: 1\nkey: '{SECRET}' x: 1\n", 2, "(file)", "not valid YAML"),
        (f"version: 1\nkey: [{SECRET}, *{SECRET}]\n", 2, "key", "unknown field"),
        ("version: 1\n\tproviders: {}\n", 2, "(file)", "not valid YAML"),
        ("version: 1\n---\nversion: 1\n", 2, "(file)", "expected a single document"),
        (f"version: 1\nx: {SECRET}\x00\n", 2, "(file)", "control character"),
        (b"version: 1\nproviders: \xff\n", 2, "(file)", "not UTF-8 text"),
    ],
)
def test_top_level_problems(text: str | bytes, line: int, field: str, words: str) -> None:
    assert_problem(text, line, field, words)


@pytest.mark.parametrize("text", ["0", "0.0", ".0", "0s", "0.0s", "0ms", "0m"])
def test_parse_duration_zero_ok_takes_every_spelling_of_zero(text: str) -> None:
    assert parse_duration(text, zero_ok=True) == 0.0
    assert parse_duration(text) is None


@pytest.mark.parametrize(
    ("value", "expected"), [("0", 0.0), ("0.0", 0.0), ("'0'", 0.0), ("0s", 0.0), ("0.0s", 0.0), ("0ms", 0.0), ("250ms", 0.25), ("2", 2.0)]
)  # fmt: skip
def test_queue_wait_zero_in_any_spelling_answers_at_once(value: str, expected: float) -> None:
    (p,) = parse_policy(provider("hosts: [a.com]", NONE, f"queue_wait: {value}")).providers
    assert p.queue_wait == expected


def test_members_with_their_own_secrets_need_no_default() -> None:
    text = provider(
        "hosts: [a.com]",
        "auth: {type: bearer}",
        "upstreams:",
        "  - {name: key-a, secret: env:KEY_A}",
        "  - {name: key-b, secret: file:key-b}",
    )
    (p,) = parse_policy(text, base_dir=BASE).providers
    assert p.auth == Auth("bearer", None)
    assert [p.secret_of(t) for t in p.targets] == [SecretRef("env", "KEY_A"), SecretRef("file", "/base/key-b")]


@pytest.mark.parametrize(
    ("text", "found"),
    [
        # a member without a secret and no default: that member's line
        (provider(A, "auth: {type: bearer}", "upstreams:", "  - {name: a, secret: env:K}", "  - {name: b}"),
         [(8, "providers.p.upstreams[1].secret", "required: env:NAME or file:PATH (auth.secret gives no default)")]),
        (provider(A, "auth: {type: query, param: key}", "upstreams:", "  - name: a", "    weight: 2", "  - {name: b, secret: env:K}"),
         [(7, "providers.p.upstreams[0].secret", "required: env:NAME or file:PATH (auth.secret gives no default)")]),
        # no members at all: the default is the only secret, as before
        (provider(A, "auth: {type: bearer}"), [(5, "providers.p.auth.secret", "required: env:NAME or file:PATH (or one on every upstream)")]),
        (provider(A, "auth:", "  type: header", "  header: x-k", "upstreams:"),
         [(6, "providers.p.auth.secret", "required: env:NAME or file:PATH (or one on every upstream)")]),
    ],
)  # fmt: skip
def test_a_member_without_a_secret_needs_the_default(text: str, found: list[tuple[int, str, str]]) -> None:
    assert [(p.line, p.field, p.message) for p in problems(text)] == found


def test_error_string_format() -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy("version: 1\nunmatched: maybe\n", "policies.yaml")
    assert str(info.value) == "policies.yaml:2: unmatched: expected one of: tunnel, deny"
    assert info.value.problems == (PolicyProblem("policies.yaml", 2, "unmatched", "expected one of: tunnel, deny"),)


def test_all_problems_collected_in_file_order() -> None:
    text = (
        "version: 1\n"
        "providers:\n"
        "  a:\n"
        "    hosts: ['https://a.com']\n"  # 4
        f"    auth: {{type: bearer, secret: {SECRET}}}\n"  # 5
        "    timeouts: {read: 0}\n"  # 6
        "  b:\n"
        "    hosts: [b.com]\n"
        "    auth: {type: header, secret: env:K}\n"  # 9
        "unmatched: maybe\n"  # 10
        "limits: {max_headers: 0}\n"  # 11
    )
    found = [(p.line, p.field) for p in problems(text)]
    assert found == [
        (4, "providers.a.hosts[0]"),
        (5, "providers.a.auth.secret"),
        (6, "providers.a.timeouts.read"),
        (9, "providers.b.auth.header"),
        (10, "unmatched"),
        (11, "limits.max_headers"),
    ]


def test_duplicate_host_across_providers_names_both_lines() -> None:
    text = (
        "version: 1\nproviders:\n"
        "  a:\n    hosts: [x.com, '*.y.com']\n    auth: {type: none}\n"
        "  b:\n    hosts:\n      - z.com\n      - X.COM.\n      - '*.Y.com'\n    auth: {type: none}\n"
    )
    found = [(p.line, p.field, p.message) for p in problems(text)]
    assert found == [
        (9, "providers.b.hosts[1]", "host pattern is also used by provider a (line 4)"),
        (10, "providers.b.hosts[2]", "host pattern is also used by provider a (line 4)"),
    ]


def test_problem_list_never_shows_values() -> None:
    text = provider(
        f"hosts: ['{SECRET}:1']",
        f"auth: {{type: header, header: '{SECRET} x', prefix: \"{SECRET}\\n\", secret: '{SECRET}'}}",
        f"upstream: 'ftp://{SECRET}'",
        f"set_headers: {{x-a: \"{SECRET}\\r\\n\", '{SECRET}!': x}}",
        f"tls: {{server_name: '{SECRET}/x'}}",
        f"timeouts: {{read: {SECRET}}}",
    )
    assert len(problems(text)) == 8


# -- files -----------------------------------------------------------------------------


def test_shipped_policy_loads() -> None:
    path = REPO / "policies.yaml"
    policy = load_policy(path)
    assert [p.name for p in policy.providers] == ["openai", "anthropic", "groq", "airtable", "nocodb", "databricks"]
    assert policy.unmatched == "tunnel"
    assert policy.source == str(path)
    assert policy.digest == hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    by_name = {p.name: p for p in policy.providers}
    expected_auth = {
        "openai": ("bearer", "authorization", "OPENAI_API_KEY"),
        "anthropic": ("header", "x-api-key", "ANTHROPIC_API_KEY"),
        "groq": ("bearer", "authorization", "GROQ_API_KEY"),
        "airtable": ("bearer", "authorization", "AIRTABLE_API_KEY"),
        "nocodb": ("header", "xc-token", "NOCODB_API_TOKEN"),
        "databricks": ("bearer", "authorization", "DATABRICKS_TOKEN"),
    }
    for name, (kind, header, env) in expected_auth.items():
        auth = by_name[name].auth
        assert (auth.type, auth.header, auth.secret) == (kind, header, SecretRef("env", env)), name
    assert by_name["anthropic"].set_headers == (("anthropic-version", "2023-06-01"),)
    assert by_name["databricks"].hosts == ("*.cloud.databricks.com", "*.azuredatabricks.net", "*.gcp.databricks.com")
    for host, name in [
        ("api.openai.com", "openai"),
        ("API.Anthropic.com.", "anthropic"),
        ("api.groq.com", "groq"),
        ("api.airtable.com", "airtable"),
        ("app.nocodb.com", "nocodb"),
        ("dbc-1234.cloud.databricks.com", "databricks"),
        ("adb-1.2.azuredatabricks.net", "databricks"),
        ("x.gcp.databricks.com", "databricks"),
    ]:
        found = policy.match(host)
        assert found is not None and found.name == name, host
    assert policy.match("cloud.databricks.com") is None
    assert policy.match("example.com") is None


def test_load_policy_resolves_paths_against_its_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "ca.pem").write_text("x\n")
    (real / "policies.yaml").write_text(
        provider(
            A,
            "auth: {type: bearer, secret: file:keys/k}",
            "tls: {ca_bundle: ca.pem}",
        ).replace("version: 1\n", "version: 1\naddons: [./mine.py]\n")
    )
    # A Kubernetes mount is a symlink to a directory that is swapped on update:
    # paths must stay under the link, not the directory it points at today.
    link = tmp_path / "mounted"
    os.symlink(real, link)
    policy = load_policy(link / "policies.yaml")
    (p,) = policy.providers
    assert p.auth.secret == SecretRef("file", str(link / "keys" / "k"))
    assert p.tls.ca_bundle == str(link / "ca.pem")
    assert policy.addons == (str(link / "mine.py"),)


def test_load_policy_reports_the_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nunmatched: maybe\n")
    with pytest.raises(PolicyError) as info:
        load_policy(path)
    assert str(info.value) == f"{path}:2: unmatched: expected one of: tunnel, deny"


# -- host matching ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("api.example.com", "exact"),
        ("API.Example.com.", "exact"),
        ("a.api.example.com", "deep"),
        ("x.a.api.example.com", "deep"),
        ("b.example.com", "wide"),
        ("x.y.example.com", "wide"),
        ("example.com", None),
        ("notexample.com", None),
        ("api.example.com.evil.test", None),
        ("10.0.0.1", "ip"),
        ("[::1]", "ip"),
        ("10.0.0.2", None),
    ],
)
def test_matching_precedence(host: str, expected: str | None) -> None:
    policy = parse_policy(
        "version: 1\nproviders:\n"
        "  wide: {hosts: ['*.example.com'], auth: {type: none}}\n"
        "  deep: {hosts: ['*.api.example.com'], auth: {type: none}}\n"
        "  exact: {hosts: [API.example.com.], auth: {type: none}}\n"
        "  ip: {hosts: [10.0.0.1, '::1'], auth: {type: none}}\n"
    )
    found = policy.match(host)
    assert (found.name if found else None) == expected


def test_policy_error_survives_pickling() -> None:
    import pickle

    err = PolicyError([PolicyProblem("p.yaml", 3, "version", "required (version: 1)")])
    copy = pickle.loads(pickle.dumps(err))
    assert copy.problems == err.problems and str(copy) == str(err)
