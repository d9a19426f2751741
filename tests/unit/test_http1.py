"""HTTP/1.1 rules (RFC 9112 / 9110) as pure functions: no sockets."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy import errors, http1
from proxy.flow import Response


def head(raw: bytes, max_headers: int = 100) -> http1.RequestHead:
    return http1.parse_request_head(raw, max_headers)


def test_parses_a_request_head() -> None:
    h = head(b"POST /v1/chat HTTP/1.1\r\nHost: api.openai.com\r\nX-A: 1\r\nx-a:  2 \r\n\r\n")
    assert (h.method, h.target, h.version) == ("POST", "/v1/chat", "HTTP/1.1")
    assert h.headers["host"] == "api.openai.com"
    assert h.headers.getall("X-A") == ["1", "2"]
    assert h.keep_alive


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"GET / HTTP/1.1 extra\r\n\r\n", "request line"),
        (b"G(T / HTTP/1.1\r\n\r\n", "invalid method"),
        (b"GET / HTTP/2.0\r\n\r\n", "HTTP/1.1"),
        (b"GET /\x01 HTTP/1.1\r\n\r\n", "request target"),
        (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", "header name"),  # RFC 9112 §5.1
        (b"GET / HTTP/1.1\r\nX: a\r\n folded\r\n\r\n", "obs-fold"),  # RFC 9112 §5.2
        (b"GET / HTTP/1.1\r\nnocolon\r\n\r\n", "colon"),
        (b"GET / HTTP/1.1\r\nX: a\x00b\r\n\r\n", "header value"),
        (b"GET / HTTP/1.1\r\nX: a\nInjected: b\r\n\r\n", "header value"),
    ],
)
def test_malformed_heads_are_refused_without_quoting_them(raw: bytes, reason: str) -> None:
    with pytest.raises(errors.BadRequest) as info:
        head(raw)
    assert reason in info.value.message
    assert info.value.status == 400


def test_too_many_headers_is_431() -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: v\r\n" % i for i in range(11)) + b"\r\n"
    with pytest.raises(errors.HeadersTooLarge) as info:
        head(raw, max_headers=10)
    assert info.value.status == 431


@pytest.mark.parametrize(
    ("fields", "version", "expected"),
    [
        ([], "HTTP/1.1", ("none", 0)),
        ([("Content-Length", "0")], "HTTP/1.1", ("none", 0)),
        ([("Content-Length", "12")], "HTTP/1.1", ("length", 12)),
        ([("Content-Length", "12, 12")], "HTTP/1.1", ("length", 12)),
        ([("Content-Length", "12"), ("Content-Length", "12")], "HTTP/1.1", ("length", 12)),
        ([("Transfer-Encoding", "chunked")], "HTTP/1.1", ("chunked", -1)),
        ([("Transfer-Encoding", "Chunked")], "HTTP/1.1", ("chunked", -1)),
    ],
)
def test_body_framing(fields: list[tuple[str, str]], version: str, expected: tuple[str, int]) -> None:
    h = http1.RequestHead("POST", "/", version, CIMultiDict(fields))
    assert http1.body_framing(h, 1000) == expected


@pytest.mark.parametrize(
    ("fields", "version", "error"),
    [
        ([("Content-Length", "5"), ("Transfer-Encoding", "chunked")], "HTTP/1.1", errors.BadRequest),  # smuggling
        ([("Content-Length", "5"), ("Content-Length", "6")], "HTTP/1.1", errors.BadRequest),
        ([("Content-Length", "-1")], "HTTP/1.1", errors.BadRequest),
        ([("Content-Length", "0x10")], "HTTP/1.1", errors.BadRequest),
        ([("Transfer-Encoding", "gzip, chunked")], "HTTP/1.1", errors.BadRequest),
        ([("Transfer-Encoding", "chunked, gzip")], "HTTP/1.1", errors.BadRequest),
        ([("Transfer-Encoding", "chunked")], "HTTP/1.0", errors.BadRequest),
        ([("Content-Length", "1001")], "HTTP/1.1", errors.BodyTooLarge),
    ],
)
def test_body_framing_refusals(fields: list[tuple[str, str]], version: str, error: type[Exception]) -> None:
    h = http1.RequestHead("POST", "/", version, CIMultiDict(fields))
    with pytest.raises(error):
        http1.body_framing(h, 1000)


@pytest.mark.parametrize(
    ("line", "size"),
    [(b"0\r\n", 0), (b"1a\r\n", 26), (b"FF;ext=1\r\n", 255), (b"10 \r\n", 16)],
)
def test_chunk_size(line: bytes, size: int) -> None:
    assert http1.parse_chunk_size(line) == size


@pytest.mark.parametrize("line", [b"\r\n", b"-1\r\n", b"zz\r\n", b"1" * 20 + b"\r\n"])
def test_bad_chunk_size(line: bytes) -> None:
    with pytest.raises(errors.BadRequest):
        http1.parse_chunk_size(line)


def test_hop_by_hop_and_connection_listed_fields_are_dropped() -> None:
    headers = CIMultiDict(
        [
            ("Connection", "keep-alive, X-Secret-Hop"),
            ("Keep-Alive", "timeout=5"),
            ("Proxy-Authorization", "Basic abc"),
            ("Proxy-Connection", "keep-alive"),
            ("TE", "trailers"),
            ("Transfer-Encoding", "chunked"),
            ("Upgrade", "websocket"),
            ("X-Secret-Hop", "1"),
            ("Content-Type", "application/json"),
        ]
    )
    assert list(http1.end_to_end(headers).items()) == [("Content-Type", "application/json")]


def test_keep_alive_defaults() -> None:
    assert not http1.RequestHead("GET", "/", "HTTP/1.1", CIMultiDict(Connection="close")).keep_alive
    assert not http1.RequestHead("GET", "/", "HTTP/1.0", CIMultiDict()).keep_alive
    assert http1.RequestHead("GET", "/", "HTTP/1.0", CIMultiDict(Connection="Keep-Alive")).keep_alive


@pytest.mark.parametrize(
    ("method", "status", "empty"),
    [("HEAD", 200, True), ("GET", 204, True), ("GET", 304, True), ("GET", 101, True), ("GET", 200, False)],
)
def test_no_body_statuses(method: str, status: int, empty: bool) -> None:
    assert http1.status_has_no_body(method, status) is empty


def test_response_head_serialisation() -> None:
    assert http1.response_head(404, [("a", "b")]) == b"HTTP/1.1 404 Not Found\r\na: b\r\n\r\n"
    assert http1.response_head(204, []) == b"HTTP/1.1 204 No Content\r\n\r\n"
    assert (
        http1.response_head(599, [("a", "1"), ("b", "\xe9")], b"Odd") == b"HTTP/1.1 599 Odd\r\na: 1\r\nb: \xe9\r\n\r\n"
    )
    with pytest.raises(UnicodeEncodeError):  # not Latin-1: refused, never sent mangled
        http1.response_head(200, [("a", "\u2603")])


@given(
    st.lists(
        st.tuples(
            st.from_regex(r"[A-Za-z][A-Za-z0-9-]{0,20}", fullmatch=True), st.from_regex(r"[ -~]{0,40}", fullmatch=True)
        ),
        max_size=20,
    )
)
def test_parse_round_trips_any_valid_field_list(fields: list[tuple[str, str]]) -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"".join(f"{k}: {v}\r\n".encode() for k, v in fields) + b"\r\n"
    parsed = head(raw)
    assert [(k, v) for k, v in parsed.headers.items()] == [(k, v.strip(" \t")) for k, v in fields]


def test_error_answers_name_their_code_in_the_status_line_and_a_header() -> None:
    err = errors.UnmatchedDenied(host="denied.example")
    raw = http1.error_response(err, b"{}", [("connection", "close")])
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    assert lines[0] == b"HTTP/1.1 403 host_not_allowed"
    assert b"x-sidekey-error: host_not_allowed" in lines and b"connection: close" in lines
    assert body == b"{}"
    resp = Response.from_error(err)
    assert (resp.status, resp.reason, resp.headers["x-sidekey-error"]) == (403, b"host_not_allowed", "host_not_allowed")
    assert Response(200).reason is None  # anything else keeps the standard phrase


def _line_by_line(raw: bytes) -> object:
    """What the line-by-line reading makes of a head's fields: the fields, or the refusal."""
    try:
        return list(http1._checked_fields(raw[:-4].split(b"\r\n")[1:]).items())
    except errors.BadRequest as err:
        return ("refused", err.fields["reason"])


def _parsed(raw: bytes) -> object:
    try:
        return list(http1.parse_request_head(raw, 1000).headers.items())
    except errors.BadRequest as err:
        return ("refused", err.fields["reason"])


# Field lines built from the pieces that matter to the two readings: token and non-token
# name bytes, the colon, OWS, obs-text, controls, bare CR and LF, line folding.
_FIELD_PIECES = st.lists(
    st.sampled_from(
        [
            b"a",
            b"X-K",
            b"-",
            b"~",
            b" ",
            b"\t",
            b":",
            b"v",
            b"\xe9",
            b"\x00",
            b"\x7f",
            b"\x1f",
            b"\r",
            b"\n",
            b'"',
            b"(",
            b"/",
        ]
    ),
    max_size=12,
).map(b"".join)


@given(st.lists(_FIELD_PIECES, max_size=6))
def test_the_fast_field_reading_answers_as_the_line_by_line_one(lines: list[bytes]) -> None:
    raw = b"GET / HTTP/1.1\r\n" + b"".join(line + b"\r\n" for line in lines) + b"\r\n"
    if b"\r\n\r\n" in raw[:-4]:
        return  # a head ends at its first empty line: read_head never passes one inside
    assert _parsed(raw) == _line_by_line(raw)


@pytest.mark.parametrize(
    "fields",
    [
        b"Host: a\r\nUser-Agent: Go-http-client/1.1\r\nContent-Length: 199\r\n",  # the fast path
        b"A:\t  x \t y \t\r\nB:\r\nC:   \r\nD: \xe9\xff\r\na: 2\r\n",  # OWS around values, obs-text
        b"a b: c\r\n",  # a line whose tail alone would be a field
        b"A: b\rc\r\n",  # bare CR
        b"A: b\nc\r\n",  # bare LF
        b"A: b\r\n c\r\n",  # obs-fold
        b"A: x\x7f\r\n",
        b":x\r\n",
        b"",
    ],
)
def test_field_readings_agree_on_edge_cases(fields: bytes) -> None:
    raw = b"GET / HTTP/1.1\r\n" + fields + b"\r\n"
    assert _parsed(raw) == _line_by_line(raw)
