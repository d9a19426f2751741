"""Request-smuggling shapes from the published corpora (PortSwigger's CL.TE / TE.CL /
TE.TE lists, the "funky chunks" chunk-line terminators, RFC 9112 §11.2) sent as raw
bytes to a real sidekey process: each is refused with its status, the connection is
closed after the answer, and nothing reaches the upstream fake.

Every case is a plain-proxy request (absolute-form ``http://``), the path where sidekey
parses the client's HTTP/1.1 itself; requests inside a CONNECT tunnel go through the
same parser (proxy/http_session.py). Where a case ends in a second request, that request is
what a desynchronised peer would have run: it must not reach the upstream either.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fakes.provider import FakeProviderThread
from tests.integration.conftest import SECRET_ENV, policy_for
from tests.integration.sidekey_process import SidekeyProcess

URL = b"http://api.openai.com/echo"
POST = b"POST " + URL + b" HTTP/1.1\r\nHost: api.openai.com\r\n"
SMUGGLED = b"GET http://api.openai.com/echo/smuggled HTTP/1.1\r\nHost: api.openai.com\r\n\r\n"
CHUNKED_BODY = b"0\r\n\r\n" + SMUGGLED  # TE reads an empty body, then a second request


def post(*fields: bytes, body: bytes = b"") -> bytes:
    return POST + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body


def chunked(first_chunk_line: bytes) -> bytes:
    return post(b"Transfer-Encoding: chunked", body=first_chunk_line + b"hello\r\n0\r\n\r\n" + SMUGGLED)


# (case id, bytes sent, status expected; None: no answer, just a close)
CASES: list[tuple[str, bytes, int | None]] = [
    # RFC 9112 §6.1: "A server MAY reject a request that contains both Content-Length and
    # Transfer-Encoding ... Regardless, the server MUST close the connection after
    # responding to such a request"; §11.2 names this as the smuggling vector. We reject.
    ("CL.TE", post(b"Content-Length: %d" % len(CHUNKED_BODY), b"Transfer-Encoding: chunked", body=CHUNKED_BODY), 400),
    ("TE.CL", post(b"Transfer-Encoding: chunked", b"Content-Length: 4", body=b"5c\r\n" + SMUGGLED), 400),
    # RFC 9112 §6.3 (4): "If a Transfer-Encoding header field is present in a request and
    # the chunked transfer coding is not the final encoding, the message body length cannot
    # be determined reliably; the server MUST respond with the 400 (Bad Request) status code
    # and then close the connection."  TE.TE obfuscations, each alone and beside a CL:
    ("TE xchunked", post(b"Transfer-Encoding: xchunked", body=CHUNKED_BODY), 400),
    ("TE xchunked + CL", post(b"Content-Length: 5", b"Transfer-Encoding: xchunked", body=CHUNKED_BODY), 400),
    ("TE chunked, identity", post(b"Transfer-Encoding: chunked, identity", body=CHUNKED_BODY), 400),
    ("TE chunked then x", post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: x", body=CHUNKED_BODY), 400),
    (
        "TE x then chunked + CL",
        post(b"Transfer-Encoding: x", b"Transfer-Encoding: chunked", b"Content-Length: 5", body=CHUNKED_BODY),
        400,
    ),
    # §6.1: "A sender MUST NOT apply the chunked transfer coding more than once".
    ("TE chunked twice", post(b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked", body=CHUNKED_BODY), 400),
    ("TE chunked,chunked", post(b"Transfer-Encoding: chunked,chunked", body=CHUNKED_BODY), 400),
    # HTAB is OWS (RFC 9110 §5.6.3), so this is chunked: refused for TE beside CL (§6.1).
    ("TE tab chunked + CL", post(b"Content-Length: 5", b"Transfer-Encoding:\tchunked", body=CHUNKED_BODY), 400),
    # NBSP is not OWS: an unknown coding (once read as chunked, see test_fuzz_regressions).
    ("TE chunked NBSP", post(b"Transfer-Encoding: chunked\xa0", body=CHUNKED_BODY), 400),
    # RFC 9112 §5.1: "No whitespace is allowed between the field name and colon ... A
    # server MUST reject, with a response status code of 400 (Bad Request), any received
    # request message that contains whitespace between a header field name and colon."
    ("TE space before colon", post(b"Content-Length: 5", b"Transfer-Encoding : chunked", body=CHUNKED_BODY), 400),
    ("TE tab before colon", post(b"Transfer-Encoding\t: chunked", body=CHUNKED_BODY), 400),
    ("TE LF before colon", post(b"Transfer-Encoding\n: chunked", body=CHUNKED_BODY), 400),
    # RFC 9112 §5.2: "A server that receives an obs-fold in a request message that is not
    # within a message/http container MUST either reject the message by sending a 400 (Bad
    # Request) ... or replace each received obs-fold with one or more SP octets". We reject.
    ("TE leading space (obs-fold)", post(b"Content-Length: 5", b" Transfer-Encoding: chunked", body=CHUNKED_BODY), 400),
    ("TE leading tab (obs-fold)", post(b"\tTransfer-Encoding: chunked", body=CHUNKED_BODY), 400),
    ("obs-fold continuation", post(b"X-A: 1", b"  Transfer-Encoding: chunked", body=CHUNKED_BODY), 400),
    ("TE value folded", post(b"Transfer-Encoding:", b" chunked", body=CHUNKED_BODY), 400),
    # RFC 9112 §6.3 (5): "If a message is received without Transfer-Encoding and with an
    # invalid Content-Length header field, then the message framing is invalid and the
    # recipient MUST treat it as an unrecoverable error ... the server MUST respond with a
    # 400 (Bad Request) status code and then close the connection." Content-Length =
    # 1*DIGIT (RFC 9110 §8.6); differing duplicates are invalid.
    ("CL twice, different", post(b"Content-Length: 5", b"Content-Length: 6", body=b"hello!"), 400),
    ("CL list, different", post(b"Content-Length: 5, 6", body=b"hello!"), 400),
    ("CL list, trailing comma", post(b"Content-Length: 5,", body=b"hello"), 400),
    ("CL plus sign", post(b"Content-Length: +5", body=b"hello"), 400),
    ("CL minus sign", post(b"Content-Length: -5", body=b"hello"), 400),
    ("CL hex", post(b"Content-Length: 0x5", body=b"hello"), 400),
    ("CL inner space", post(b"Content-Length: 1 0", body=b"hello"), 400),
    ("CL decimal point", post(b"Content-Length: 5.0", body=b"hello"), 400),
    ("CL superscript digit", post(b"Content-Length: \xb2", body=b"he"), 400),
    ("CL NBSP", post(b"Content-Length: \xa05", body=b"hello"), 400),
    ("CL empty", post(b"Content-Length:", body=b"hello"), 400),
    # RFC 9110 §5.5: "a recipient of CR, LF, or NUL within a field value MUST either reject
    # the message or replace each of those characters with SP"; we reject. §2.2 of RFC
    # 9112 lets a recipient end a line at a bare LF; sidekey ends lines only at CRLF, so a
    # bare LF inside a line is a control character in it, never a line end.
    ("bare LF between fields", post(b"X-A: 1\nTransfer-Encoding: chunked", body=CHUNKED_BODY), 400),
    ("bare CR between fields", post(b"X-A: 1\rTransfer-Encoding: chunked", body=CHUNKED_BODY), 400),
    ("NUL in a value", post(b"X-A: 1\x00", b"Content-Length: 5", body=b"hello"), 400),
    ("bare LF in the request line", b"POST " + URL + b" HTTP/1.1\nHost: api.openai.com\r\n\r\n", 400),
    # Only bare LFs: the head never ends (no CRLF CRLF); the client's EOF closes it unanswered.
    ("bare LF only", b"POST " + URL + b" HTTP/1.1\nHost: api.openai.com\nContent-Length: 5\n\nhello", None),
    # RFC 9112 §7.1: chunk-size = 1*HEXDIG; §7.1.1 chunk-ext = *( BWS ";" BWS ext-name
    # [ BWS "=" BWS ext-val ] ), tokens or quoted strings. A line that another parser ends
    # elsewhere (a bare LF in an extension, "funky chunks") is refused (400) before any
    # byte of the body is forwarded. The size is read as the body starts.
    ("chunk ext with bare LF", chunked(b"5;a\nb\r\n"), 400),
    ("chunk size then bare LF", chunked(b"5\n\r\n"), 400),
    ("chunk size negative", chunked(b"-5\r\n"), 400),
    ("chunk size 0x prefix", chunked(b"0x5\r\n"), 400),
    ("chunk size overflow", chunked(b"1" + b"0" * 16 + b"5\r\n"), 400),
    ("chunk size 64-bit wrap", chunked(b"10000000000000005\r\n"), 400),
    ("chunk size empty", chunked(b";ext\r\n"), 400),
    # RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
    # HTTP/1.1 request message that ... contains more than one Host header field line or a
    # Host header field with an invalid field value."
    ("two Host lines", b"GET " + URL + b" HTTP/1.1\r\nHost: api.openai.com\r\nHost: evil.example.com\r\n\r\n", 400),
    ("Host with a space", b"GET " + URL + b" HTTP/1.1\r\nHost: api.openai.com evil.example.com\r\n\r\n", 400),
    ("Host with a superscript port", b"GET " + URL + b" HTTP/1.1\r\nHost: api.openai.com:\xb2\r\n\r\n", 400),
    ("Host with a userinfo", b"GET " + URL + b" HTTP/1.1\r\nHost: user@api.openai.com\r\n\r\n", 400),
    # RFC 9112 §3.2.2: absolute-form whose authority is not http(s) host[:port].
    (
        "absolute-form with userinfo",
        b"GET http://evil.example.com@api.openai.com/echo HTTP/1.1\r\nHost: api.openai.com\r\n\r\n",
        400,
    ),
]


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeProviderThread]:
    with FakeProviderThread() as provider:
        yield provider


@pytest.fixture(scope="module")
def proxy(fake: FakeProviderThread, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidekeyProcess]:
    """One sidekey for the whole table: every case must leave it serving, and leave the fake untouched."""
    workdir: Path = tmp_path_factory.mktemp("smuggling")
    process = SidekeyProcess(workdir, policy_for(fake), env=SECRET_ENV).start()
    yield process
    process.stop()


def send(port: int, data: bytes, timeout: float = 10.0) -> tuple[bytes, bool]:
    """Send ``data`` (then EOF), read the whole answer; True when the server closed.

    A server that kept the connection open is seen as a read timeout: not closed."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while True:
            try:
                piece = s.recv(65536)
            except ConnectionResetError:
                return out, True
            except TimeoutError:
                return out, False
            if not piece:
                return out, True
            out += piece


@pytest.mark.parametrize(("data", "status"), [pytest.param(d, s, id=i) for i, d, s in CASES])
def test_smuggling_shape_is_refused_and_closed(
    proxy: SidekeyProcess, fake: FakeProviderThread, data: bytes, status: int | None
) -> None:
    before, log_before = len(fake.received), len(proxy.log())
    reply, closed = send(proxy.port, data)
    assert closed, "the connection stayed open after a framing error"
    if status is None:
        assert reply == b""
    else:
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 %d " % status), reply[:200]
        assert b"\r\nconnection: close" in head.lower()
        assert reply.count(b"HTTP/1.1 ") == 1  # one answer: the smuggled request was not run
        assert json.loads(body)["error"]["code"]
    assert fake.received[before:] == [], "a request reached the upstream"
    assert proxy.proc is not None and proxy.proc.poll() is None
    log = proxy.log()[log_before:]
    assert "Traceback" not in log and "connection failed" not in log  # a planned refusal


def test_same_content_length_twice_is_one_request(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    """RFC 9110 §8.6: "Content-Length: 5, 5" (or the field twice) MAY be replaced by one
    value. sidekey does so: one request goes upstream with exactly those 5 bytes and one
    Content-Length, and the bytes after them are read as the next request (refused here),
    never as part of this one."""
    before = len(fake.received)
    data = (
        post(b"Content-Length: 5, 5", b"Content-Length: 5", b"Connection: keep-alive", body=b"hello")
        + b"XGET / HTTP/1.1\r\n\r\n"
    )
    reply, closed = send(proxy.port, data)
    assert closed
    assert reply.startswith(b"HTTP/1.1 200 ") and reply.count(b"HTTP/1.1 ") == 2
    assert b"HTTP/1.1 400 " in reply  # the leftover is its own (bad) request
    [received] = fake.received[before:]
    assert received.body_size == 5
    assert [v for k, v in received.headers if k.lower() == "content-length"] == ["5"]


def test_host_disagreeing_with_absolute_form_is_replaced(proxy: SidekeyProcess, fake: FakeProviderThread) -> None:
    """RFC 9112 §3.2.2: "When a proxy receives a request with an absolute-form of
    request-target, the proxy MUST ignore the received Host header field (if any) and
    instead replace it with the host information of the request-target." Routing follows
    the request-target and the other host never goes upstream."""
    before = len(fake.received)
    reply, closed = send(proxy.port, b"GET " + URL + b" HTTP/1.1\r\nHost: evil.example.com\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:200]
    [received] = fake.received[before:]
    assert received.path == "/echo"
    assert "evil" not in received.host_header
    assert all("evil" not in v for _, v in received.headers)


def test_bad_chunked_bodies_do_not_open_the_upstreams_circuit(start_sidekey: object, fake: FakeProviderThread) -> None:
    """A chunked body is streamed upstream as it arrives, so a malformed chunk line is found
    after the upstream attempt started. That is the caller's fault: it is answered 400 and
    must not count as an upstream failure, or any one client could open the provider's
    circuit for everyone (it did: the table above saw 503 circuit_open after five)."""
    proxy = start_sidekey(policy_for(fake, extra=""))  # type: ignore[operator]
    for _ in range(8):  # more than the default failure threshold (5)
        reply, closed = send(proxy.port, chunked(b"-5\r\n"))
        assert reply.startswith(b"HTTP/1.1 400 ") and closed, reply[:200]
    reply, _ = send(proxy.port, b"GET " + URL + b" HTTP/1.1\r\nHost: api.openai.com\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]
