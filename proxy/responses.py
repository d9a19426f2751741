"""Writing answers to the client: the head sidekey finishes (request id,
who served it, attempts), a local answer, an error outside any flow, an
upstream body streamed piece by piece as it arrives (chunked when its length
is unknown), and the in-band SSE error event when a stream dies mid-answer.
Used by the HTTP/1.1 session (``proxy.http_session``) and WebSocket upgrades
answered as HTTP (``proxy.ws_session``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from aiohttp import ClientResponse
from multidict import CIMultiDict

from proxy import errors, http1, upstream
from proxy.flow import Flow

if TYPE_CHECKING:
    from proxy.conn import ClientConn, Engine

SMALL_BODY = 65536  # bodies up to this are read whole (request) or sent in one write (response)
FLUSH_WAIT = 10.0  # seconds an error event may take to reach a slow client before the abort


def _finish_headers(conn: ClientConn, flow: Flow, headers: CIMultiDict[str], keep: bool) -> None:
    conn.head_sent = True
    headers["x-sidekey-request-id"] = flow.id
    state = flow.upstream_state
    if state is not None:  # who served it (a fallback provider, a member of a key pool)
        headers["x-sidekey-provider"] = state.provider
        headers["x-sidekey-upstream"] = state.name
    if "attempts" in flow.metadata:
        headers["x-sidekey-attempts"] = str(flow.metadata["attempts"])
    if not keep:
        headers["connection"] = "close"


async def send_local(conn: ClientConn, flow: Flow, keep: bool) -> None:
    resp = flow.response
    assert resp is not None and resp.body is not None
    _finish_headers(conn, flow, resp.headers, keep)
    no_body = http1.status_has_no_body(flow.request.method, resp.status)
    resp.headers["content-length"] = str(len(resp.body))
    conn.head_sent = True
    head = http1.response_head(resp.status, resp.headers.items(), resp.reason)
    conn.writer.write(head + (b"" if no_body else resp.body))
    flow.bytes_to_client += len(resp.body)
    await conn.writer.drain()


async def send_error(conn: ClientConn, err: errors.ProxyError, request_id: str) -> None:
    """An answer outside any flow (bad head, refused target); then we close."""
    body = errors.render_error(err)
    extra = [("x-sidekey-request-id", request_id), ("connection", "close")]
    try:
        conn.writer.write(http1.error_response(err, body, extra))
        await conn.writer.drain()
    except ConnectionError:
        pass


async def stream_response(engine: Engine, conn: ClientConn, flow: Flow, resp: ClientResponse, keep: bool) -> bool:
    out = flow.response
    assert out is not None
    headers, writer, content = out.headers, conn.writer, resp.content
    keep = keep and not engine.draining
    if http1.status_has_no_body(flow.request.method, out.status):
        _finish_headers(conn, flow, headers, keep)
        writer.write(http1.response_head(out.status, headers.items()))
        await writer.drain()
        return keep
    length = resp.content_length if not resp.headers.get("transfer-encoding") else None
    if length is not None and length <= SMALL_BODY:
        data = await _upstream_read(resp, content.readexactly(length), flow)
        if flow.body_observer is not None:
            flow.body_observer(data)
        _finish_headers(conn, flow, headers, keep)
        writer.write(http1.response_head(out.status, headers.items()) + data)
        flow.bytes_to_client += length
        try:
            await writer.drain()
        except OSError:
            flow.metadata["upstream_complete"] = True  # the client left, but the whole answer came
            raise
        return keep
    chunked = length is None and flow.request.http_version == "HTTP/1.1"
    if length is None:
        headers.popall("content-length", None)
        if chunked:
            headers["transfer-encoding"] = "chunked"
        else:
            keep = False  # HTTP/1.0 client: the end of the body is the close
    _finish_headers(conn, flow, headers, keep)
    writer.write(http1.response_head(out.status, headers.items()))
    try:
        sent, ended = await _relay_body(writer, flow, resp, headers, chunked)
        if length is not None and sent != length:
            raise errors.UpstreamDisconnected(flow.provider_name)
        if chunked and not ended:
            writer.write(b"0\r\n\r\n")
            await writer.drain()
    except OSError:  # the client left mid-answer
        await _read_for_others(flow, resp)
        raise
    flow.bytes_to_client += sent
    return keep


async def _relay_body(writer: asyncio.StreamWriter, flow: Flow, resp: ClientResponse, headers: CIMultiDict[str],
                      chunked: bool) -> tuple[int, bool]:  # fmt: skip
    """A large or streamed body, piece by piece as it arrives; the bytes sent, and
    whether the chunked terminator went out with the last piece.

    When the upstream's end came with its last piece (the parser saw both in one read,
    as nginx and aiohttp's ``write_eof(data)`` send them), the terminator goes in the
    same write: one TLS record, so a client that stops reading at the last SSE event
    (``[DONE]``, ``message_stop``) has already seen the end and keeps its connection
    (Go's client closes one whose body it closes before EOF)."""
    content = resp.content
    sent = 0
    while True:
        try:
            piece = await _upstream_read(resp, content.readany(), flow)
        except errors.ProxyError as err:
            if chunked and _wants_sse_error(flow, headers):
                # The stream died mid-answer: say so in-band for SSE clients,
                # then the caller aborts without the terminating chunk.
                event = errors.sse_error_event(err)
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            raise
        if not piece:
            return sent, False
        if not sent:
            flow.timings["first_body_byte"] = time.monotonic()
        if flow.body_observer is not None:
            flow.body_observer(piece)
        sent += len(piece)
        if not chunked:
            writer.write(piece)
        elif content.at_eof():
            writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(piece), piece))
            await writer.drain()
            return sent, True
        else:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
        await writer.drain()


async def stream_local(conn: ClientConn, flow: Flow, pieces: AsyncIterator[bytes], keep: bool) -> bool:
    """A local answer whose body arrives while it is sent; framed by its
    content-length when it has one, else chunked (HTTP/1.0: by the close)."""
    out = flow.response
    assert out is not None
    headers, writer = out.headers, conn.writer
    length = headers.get("content-length")
    chunked = length is None and flow.request.http_version == "HTTP/1.1"
    if chunked:
        headers["transfer-encoding"] = "chunked"
    elif length is None:
        keep = False
    no_body = http1.status_has_no_body(flow.request.method, out.status)
    _finish_headers(conn, flow, headers, keep)
    writer.write(http1.response_head(out.status, headers.items(), out.reason))
    sent = 0
    try:
        async for piece in pieces:
            if not no_body and piece:
                sent += len(piece)
                writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
                await writer.drain()
    except errors.ProxyError as err:
        if chunked and _wants_sse_error(flow, headers):
            event = errors.sse_error_event(err)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        if err.flush_before_abort:
            await _flush(writer)
        raise
    finally:
        flow.bytes_to_client += sent
    if chunked and not no_body:
        writer.write(b"0\r\n\r\n")
    await writer.drain()
    return keep


async def _read_for_others(flow: Flow, resp: ClientResponse) -> None:
    """The client left mid-answer. When others read this answer too (the cache's
    coalesced followers: ``flow.metadata["read_for_others"]``), the upstream body
    is still read to its end into the flow's observer for them, and the flow is
    marked ``upstream_complete``; otherwise the upstream is dropped at once."""
    others = flow.metadata.get("read_for_others") if flow.metadata else None
    observer = flow.body_observer
    if others is None or observer is None or not others():
        return
    while piece := await _upstream_read(resp, resp.content.readany(), flow):
        observer(piece)
    flow.metadata["upstream_complete"] = True


async def _flush(writer: asyncio.StreamWriter) -> None:
    """Until what was written (an error event) left for the client, or ``FLUSH_WAIT``:
    the abort that follows would drop a buffered event, and this client reads slowly."""
    try:
        writer.transport.set_write_buffer_limits(0)
        async with asyncio.timeout(FLUSH_WAIT):
            await writer.drain()
    except (OSError, TimeoutError, RuntimeError):
        pass


def _wants_sse_error(flow: Flow, headers: CIMultiDict[str]) -> bool:
    provider = flow.provider
    return (
        provider is not None
        and provider.sse_error_event
        and headers.get("content-type", "").startswith("text/event-stream")
    )


async def _upstream_read(resp: ClientResponse, aw: object, flow: Flow) -> bytes:
    try:
        return await aw  # type: ignore[misc, no-any-return]
    except asyncio.IncompleteReadError:
        raise errors.UpstreamDisconnected(flow.provider_name) from None
    except Exception as exc:  # noqa: BLE001 - mapped in one place
        raise upstream.map_error(exc, flow.provider_name) from None
