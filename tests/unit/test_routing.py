"""Authority parsing and upstream URLs: pure, table-driven."""

from __future__ import annotations

import pytest

from proxy import errors, routing
from proxy.policy import Auth, Provider, Upstream


@pytest.mark.parametrize(
    ("authority", "expected"),
    [
        ("api.openai.com:443", ("api.openai.com", 443)),
        ("API.OpenAI.com.:8443", ("api.openai.com", 8443)),
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:443", ("::1", 443)),
        ("[FD00:EC2::254]:80", ("fd00:ec2::254", 80)),
    ],
)
def test_parse_authority(authority: str, expected: tuple[str, int]) -> None:
    assert routing.parse_authority(authority) == expected


@pytest.mark.parametrize(
    "authority",
    [
        "api.openai.com",
        "user:pw@api.openai.com:443",
        "host:0",
        "host:70000",
        "host:ab",
        "[::1",
        "bad host:443",
        ":443",
        "a/b:443",
    ],
)
def test_parse_authority_refusals(authority: str) -> None:
    with pytest.raises(errors.BadRequest):
        routing.parse_authority(authority)


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("http://api.openai.com/v1/models", ("http", "api.openai.com", 80, "/v1/models")),
        ("http://api.openai.com", ("http", "api.openai.com", 80, "/")),
        ("http://api.openai.com?x=1", ("http", "api.openai.com", 80, "/?x=1")),
        ("https://h:8443/a?b=c#frag", ("https", "h", 8443, "/a?b=c")),
        ("HTTP://H/", ("http", "h", 80, "/")),
    ],
)
def test_split_absolute(uri: str, expected: tuple[str, str, int, str]) -> None:
    assert routing.split_absolute(uri) == expected


@pytest.mark.parametrize("uri", ["ftp://h/", "/relative", "http://user@h/", "http:///x"])
def test_split_absolute_refusals(uri: str) -> None:
    with pytest.raises(errors.BadRequest):
        routing.split_absolute(uri)


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("api.openai.com", True),
        ("API.openai.com:443", True),
        ("api.openai.com.", True),
        ("api.openai.com:8443", False),
        ("evil.example.com", False),
        ("api.openai.com@evil.example.com", False),
        ("", False),
    ],
)
def test_host_header_must_name_the_connect_target(value: str, ok: bool) -> None:
    assert routing.authority_matches(value, "api.openai.com", 443) is ok


def _provider(upstream: Upstream | None) -> Provider:
    return Provider(name="p", hosts=("api.example.com",), upstream=upstream, auth=Auth("none", None))


@pytest.mark.parametrize(
    ("upstream", "host", "port", "expected"),
    [
        (None, "api.example.com", 443, "https://api.example.com/v1/x?q=1"),
        (None, "api.example.com", 8443, "https://api.example.com:8443/v1/x?q=1"),
        (Upstream("eu.example.com", 443), "api.example.com", 443, "https://eu.example.com/v1/x?q=1"),
        (
            Upstream("gw.example.com", 9443, "/openai"),
            "api.example.com",
            443,
            "https://gw.example.com:9443/openai/v1/x?q=1",
        ),
        (Upstream("::1", 443), "api.example.com", 443, "https://[::1]/v1/x?q=1"),
    ],
)
def test_upstream_url(upstream: Upstream | None, host: str, port: int, expected: str) -> None:
    assert routing.upstream_url(_provider(upstream), "http", host, port, "/v1/x?q=1") == expected


def test_unmatched_plain_request_keeps_its_scheme() -> None:
    assert routing.upstream_url(None, "http", "example.com", 80, "/") == "http://example.com/"
