"""Fuzz the HTTP/1.1 request path: head, target, body framing and the chunked body.

Mirrors what the listener does with the bytes of one connection (proxy/server.py
``_dispatch``, proxy/http_session.py ``read_head``/``handle``, proxy/bodies.py), minus
the network: the bytes are fed to an in-memory ``asyncio.StreamReader`` with the
listener's header limit. The only allowed failure is a ``ProxyError`` (a planned
4xx answer); any other exception is a crash.

    python fuzz/http1_fuzz.py -atheris_runs=5000 /tmp/new fuzz/corpus/http1
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import atheris

with atheris.instrument_imports():
    from proxy import http1, routing
    from proxy.bodies import BodyReader
    from proxy.errors import ProxyError

MAX_HEADER_BYTES = 4096  # small, so the limit path is reachable from short inputs
MAX_HEADERS = 20
MAX_BODY = 1 << 16

_loop = asyncio.new_event_loop()


async def one_request(data: bytes) -> None:
    reader = asyncio.StreamReader(limit=MAX_HEADER_BYTES)
    reader.feed_data(data)
    reader.feed_eof()
    try:
        raw = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        return  # read_head: 431
    except asyncio.IncompleteReadError:
        return  # read_head: EOF, close
    head = http1.parse_request_head(raw, MAX_HEADERS)
    _ = head.keep_alive
    if head.method == "CONNECT":
        host, port = routing.parse_authority(head.target)
        routing.format_authority(host, port)
        return
    if not head.target.startswith(("http://", "https://")):
        return  # the engine refuses it with 400
    scheme, host, port, path = routing.split_absolute(head.target)
    for value in head.headers.getall("host", ()):
        routing.authority_matches(value, host, port)
    http1.end_to_end(head.headers, http1.HOP_BY_HOP | {"host", "content-length", "expect"})  # as http_session.route
    kind, length = http1.body_framing(head, MAX_BODY)
    if not 0 <= length <= MAX_BODY and kind != "chunked":
        raise AssertionError("body_framing returned a length outside [0, max_body]")
    body = BodyReader(reader, kind, length, max_bytes=MAX_BODY, timeout=5)
    content = await body.read_all()
    if body.received > MAX_BODY or not body.complete or len(content) != body.received:
        raise AssertionError("body reader overran its limit or lied about completion")


def test_one_input(data: bytes) -> None:
    with contextlib.suppress(ProxyError):  # a planned refusal: 400, 413, 431, ...
        _loop.run_until_complete(one_request(data))


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
