"""Defects found by the fuzz harnesses (fuzz/) and by the request-smuggling table,
one regression test each. Each test names the input that used to escape as an
exception other than the documented one, or that was accepted against RFC 9112.
Pure: no sockets."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict

from proxy import errors, http1, routing
from proxy.policy.load import PolicyError, parse_policy


def framing(*fields: tuple[str, str]) -> tuple[str, int]:
    return http1.body_framing(http1.RequestHead("POST", "http://x/", "HTTP/1.1", CIMultiDict(fields)), 1000)


# fuzz/http1_fuzz.py, first smoke run: a request target with a byte >= 0x80 passed the
# control-character check and then failed ``decode("ascii")`` with UnicodeDecodeError
# (the listener logged "connection failed" and closed without an answer).
@pytest.mark.parametrize("target", [b"api.openai.c\xff\xffom:443", b"http://x/\xc3\xa9", b"/\x80"])
def test_non_ascii_request_target_is_400(target: bytes) -> None:
    with pytest.raises(errors.BadRequest) as info:
        http1.parse_request_head(b"GET " + target + b" HTTP/1.1\r\n\r\n", 10)
    assert "request target" in info.value.message


# Content-Length digits were checked with str.isdigit(), which is true for the
# latin-1 superscripts; int() then raised ValueError. RFC 9110 §8.6: 1*DIGIT (ASCII).
@pytest.mark.parametrize("value", ["\xb2", "1\xb9", "\xb3\xb3"])
def test_superscript_digits_in_content_length_are_400(value: str) -> None:
    with pytest.raises(errors.BadRequest):
        framing(("Content-Length", value))


# Framing values were trimmed with str.strip(), which also strips NBSP (0xA0) and NEL
# (0x85) as decoded from latin-1: "chunked\xa0" was read as chunked and "\xa05" as 5,
# where a stricter peer sees an unknown coding or an invalid length (a smuggling
# disagreement). RFC 9110 §5.6.3: the only whitespace around a value is OWS = SP / HTAB.
@pytest.mark.parametrize(
    "fields",
    [
        (("Content-Length", "\xa05"),),
        (("Content-Length", "5\x85"),),
        (("Transfer-Encoding", "chunked\xa0"),),
        (("Transfer-Encoding", "\x85chunked"),),
    ],
)
def test_non_ows_whitespace_around_framing_values_is_400(fields: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(errors.BadRequest):
        framing(*fields)


# A chunk extension was skipped without looking at it, so a bare LF (or CR) inside the
# chunk-size line was accepted: a peer that ends lines at LF reads a different body
# ("funky chunks"). RFC 9112 §7.1.1: chunk-ext is tokens and quoted strings; §2.2 lets a
# recipient treat a bare LF as a line end, never as part of a line.
@pytest.mark.parametrize("line", [b"5;a\nb\r\n", b"5;a\rb\r\n", b"5;\x00\r\n", b"5\n\r\n"])
def test_control_characters_in_a_chunk_size_line_are_400(line: bytes) -> None:
    with pytest.raises(errors.BadRequest):
        http1.parse_chunk_size(line)


def test_chunk_extensions_are_still_accepted() -> None:
    assert http1.parse_chunk_size(b'5;name=value;q="a b"\r\n') == 5
    assert http1.parse_chunk_size(b"5 ;name\r\n") == 5  # BWS before ";" (RFC 9112 §7.1.1)


# fuzz/policy_fuzz.py: YAML nested a few hundred levels deep raised RecursionError from
# PyYAML's composer instead of a line-numbered PolicyError.
@pytest.mark.parametrize("text", ["[" * 5000, "a: " + "{a: " * 3000, "- " * 3000, "x:\n" + "  - " * 2000])
def test_deeply_nested_policy_is_a_policy_error(text: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    [problem] = info.value.problems
    assert problem.line >= 1 and problem.field == "(file)" and "nest" in problem.message


# fuzz/http1_fuzz.py (Host values go through authority_matches): a port of latin-1
# superscript digits passed str.isdigit() and int() raised ValueError, which
# authority_matches does not catch (a Host header inside a CONNECT tunnel).
@pytest.mark.parametrize("authority", ["api.openai.com:\xb2", "x:4\xb3", "[::1]:\xb9"])
def test_superscript_digits_in_a_port_are_400(authority: str) -> None:
    with pytest.raises(errors.BadRequest):
        routing.parse_authority(authority, 443)
    assert not routing.authority_matches(authority, "api.openai.com", 443)


# fuzz/policy_fuzz.py, the 5-minute run (input: the shipped policy with one byte changed):
# a fallback naming a provider whose own hosts were invalid or empty raised IndexError
# (check_references read hosts[0]) instead of reporting the hosts problem.
@pytest.mark.parametrize("hosts", ["[]", '["bad host"]', "7"])
def test_fallback_to_a_provider_without_valid_hosts_is_a_policy_error(hosts: str) -> None:
    text = f"""version: 1
providers:
  a:
    hosts: [a.test]
    upstream: https://a.test
    auth: {{type: none}}
    fallbacks: [{{provider: b}}]
  b:
    hosts: {hosts}
    upstream: https://b.test
    auth: {{type: none}}
"""
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "p.yaml")
    [problem] = info.value.problems
    assert problem.line == 9 and problem.field.startswith("providers.b.hosts")
