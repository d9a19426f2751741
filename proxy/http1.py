"""HTTP/1.1 message rules as pure functions: parse a request head, decide body
framing, drop hop-by-hop headers, serialise a response head.

No I/O here. The listener reads bytes and calls these; the rules quoted are
RFC 9112 (HTTP/1.1) and RFC 9110 (semantics).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Literal

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.errors import ERROR_HEADER, BadRequest, BodyTooLarge, HeadersTooLarge, ProxyError, reason_phrase

# RFC 9110 §5.6.2: token = 1*tchar
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# Field values: visible ASCII, obs-text, SP and HTAB. CR, LF, NUL and other
# controls are refused (RFC 9110 §5.5: a recipient of CR, LF or NUL in a value
# MUST reject the message or replace them; we reject).
_BAD_VALUE = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 9112 §3.2: the request-target is URI syntax (RFC 3986), visible ASCII only;
# a byte >= 0x80 is refused like a control (RFC 9112 §3: invalid request-line, 400).
_BAD_TARGET = re.compile(rb"[^\x21-\x7e]")
# The fast reading of a block of field lines (``parse_request_head``): each line a token, a
# colon, OWS and a value without CR (the block's CR and LF counts and _CONTROLS make sure
# no CR, LF or other control is inside a value), at the start of a line (re.M), so a line
# that does not match as a whole is not found and the count of fields falls short.
_FIELD = re.compile(r"^([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\r]*)\r\n", re.M)
# The controls a value may not hold besides CR and LF (HTAB is allowed): _BAD_VALUE's.
_CONTROLS = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])
# RFC 9110 §8.6: Content-Length = 1*DIGIT, ASCII digits (str.isdigit() also takes "²").
_DIGITS = re.compile(r"[0-9]{1,18}\Z")
# RFC 9110 §5.6.3: OWS = *( SP / HTAB ); str.strip() would also take NBSP and NEL.
_OWS = " \t"

REASONS: dict[int, bytes] = {s.value: s.phrase.encode() for s in HTTPStatus}

# RFC 9110 §7.6.1: connection-specific fields a proxy must not forward, plus
# the proxy-to-proxy fields of §11.7 and the legacy Proxy-Connection.
HOP_BY_HOP: frozenset[str] = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

BodyKind = Literal["none", "length", "chunked"]
Headers = CIMultiDict[str] | CIMultiDictProxy[str]


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: CIMultiDict[str]

    @property
    def keep_alive(self) -> bool:
        conn = self.headers.get("connection", "").lower()
        if self.version == "HTTP/1.0":
            return "keep-alive" in conn
        return "close" not in conn


def parse_request_head(data: bytes, max_headers: int) -> RequestHead:
    """Parse ``request-line CRLF *(field-line CRLF) CRLF``.

    ``data`` ends with the empty line. Anything malformed raises BadRequest
    with a reason that never quotes the offending bytes (they may be a key).
    """
    lines = data[:-4].split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest(reason="request line is not 'method target version'")
    method, target, version = parts
    if not _TOKEN.match(method):
        raise BadRequest(reason="invalid method")
    if not target or _BAD_TARGET.search(target):
        raise BadRequest(reason="invalid request target")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest(reason="only HTTP/1.1 and HTTP/1.0 are supported")
    if len(lines) - 1 > max_headers:
        raise HeadersTooLarge(limit=f"{max_headers} fields")
    fields = _fast_fields(data[len(lines[0]) + 2 : -2], len(lines) - 1)
    if fields is None:
        fields = _checked_fields(lines[1:])  # says what is wrong (or reads what the fast path would not)
    return RequestHead(method.decode("ascii"), target.decode("ascii"), version.decode("ascii"), fields)


def _fast_fields(block: bytes, count: int) -> CIMultiDict[str] | None:
    """``_checked_fields``'s answer for a well-formed block (every field line, each ending in
    CRLF) from C-level scans and one regex, about half its instructions; None for anything
    else (a bad line, trailing OWS in a value), which the line-by-line reading then takes."""
    if (
        block.count(b"\r") != count
        or block.count(b"\n") != count
        or len(block.translate(None, _CONTROLS)) != len(block)
    ):
        return None
    text = block.decode("latin-1")
    if " \r" in text or "\t\r" in text:
        return None  # trailing OWS: rare, stripped by the slow path
    pairs = _FIELD.findall(text)
    return CIMultiDict(pairs) if len(pairs) == count else None


def _checked_fields(lines: list[bytes]) -> CIMultiDict[str]:
    """The field lines one at a time: says what is wrong with the first bad one."""
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest(reason="obs-fold (line folding) is not allowed")
        name, sep, value = line.partition(b":")
        if not sep:
            raise BadRequest(reason="header line without a colon")
        # RFC 9112 §5.1: no whitespace between name and colon (400), and
        # §5.2: obs-fold is refused; both are request-smuggling vectors.
        if not _TOKEN.match(name):
            raise BadRequest(reason="invalid header name")
        value = value.strip(b" \t")
        if _BAD_VALUE.search(value):
            raise BadRequest(reason="invalid character in a header value")
        headers.add(name.decode("ascii"), value.decode("latin-1"))
    return headers


def body_framing(head: RequestHead, max_body: int) -> tuple[BodyKind, int]:
    """RFC 9112 §6.3: how long the request body is. Returns (kind, length)."""
    headers = head.headers
    te = headers.getall("transfer-encoding", None)
    cl = headers.getall("content-length", None)
    if te is not None:
        # §6.3 (3): TE and CL together is a smuggling attempt; refuse it.
        if cl is not None:
            raise BadRequest(reason="both Transfer-Encoding and Content-Length")
        if head.version == "HTTP/1.0":
            raise BadRequest(reason="Transfer-Encoding in an HTTP/1.0 request")
        codings = [c.strip(_OWS).lower() for v in te for c in v.split(",") if c.strip(_OWS)]
        # §6.3 (4): chunked must be final; we accept no other coding (§6.1: 501
        # would be allowed, but a clear 400 is simpler for callers).
        if codings != ["chunked"]:
            raise BadRequest(reason="unsupported Transfer-Encoding")
        return "chunked", -1
    if cl is not None:
        values = {v.strip(_OWS) for item in cl for v in item.split(",")}
        if len(values) != 1:
            raise BadRequest(reason="conflicting Content-Length values")
        value = values.pop()
        if not _DIGITS.match(value):
            raise BadRequest(reason="invalid Content-Length")
        length = int(value)
        if length > max_body:
            raise BodyTooLarge(limit=max_body)
        return ("length", length) if length else ("none", 0)
    return "none", 0


def parse_chunk_size(line: bytes) -> int:
    """RFC 9112 §7.1: ``chunk-size [ chunk-ext ] CRLF``; extensions ignored.

    ``line`` ends at the first CRLF. A CR, LF or other control before it is
    refused: §7.1.1 allows only tokens and quoted strings in an extension, and a
    peer that ends lines at a bare LF (§2.2) would read a different body."""
    line = line.removesuffix(b"\r\n")
    if _BAD_VALUE.search(line):
        raise BadRequest(reason="invalid chunk size")
    size, _, _ext = line.partition(b";")
    size = size.strip(b" \t")
    if not size or len(size) > 15 or size.strip(b"0123456789abcdefABCDEF"):
        raise BadRequest(reason="invalid chunk size")
    return int(size, 16)


def connection_tokens(headers: Headers) -> set[str]:
    """Field names listed in Connection are hop-by-hop too (RFC 9110 §7.6.1)."""
    tokens: set[str] = set()
    for value in headers.getall("connection", ()):
        tokens.update(t.strip().lower() for t in value.split(",") if t.strip())
    return tokens


def end_to_end(headers: Headers, drop: frozenset[str] = HOP_BY_HOP) -> CIMultiDict[str]:
    """A copy of ``headers`` without the fields in ``drop`` (lower-case: HOP_BY_HOP, or
    HOP_BY_HOP and more) and those Connection names. Copied in C, then the few names
    present deleted: about 3x cheaper than filtering every field in Python, and this
    runs twice a request."""
    if "connection" in headers:
        drop = drop | connection_tokens(headers)
    out = CIMultiDict(headers)
    for name in drop:
        if name in out:
            del out[name]  # every field of that name
    return out


def response_head(status: int, headers: Iterable[tuple[str, str]], reason: bytes | None = None) -> bytes:
    """Serialise a status line and fields; values were checked for CR/LF by
    whoever set them (aiohttp's parser for upstream responses, us for ours)."""
    # One join and one encode for the whole block: about 3x cheaper than encoding each field,
    # and this runs for every response.
    fields = "\r\n".join([": ".join(field) for field in headers])
    if fields:
        fields += "\r\n"
    return b"HTTP/1.1 %d %s\r\n%s\r\n" % (status, reason or REASONS.get(status, b"Unknown"), fields.encode("latin-1"))


def status_has_no_body(method: str, status: int) -> bool:
    """RFC 9110 §6.4.1: HEAD, 1xx, 204 and 304 responses carry no content."""
    return method == "HEAD" or status < 200 or status in (204, 304)


def error_response(err: ProxyError, body: bytes, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    headers = [
        ("content-type", "application/json"),
        ("content-length", str(len(body))),
        (ERROR_HEADER, err.code),
        *extra,
    ]
    return response_head(err.status, headers, reason_phrase(err)) + body
