"""The HTTP/1.1 keep-alive loop on one client stream (decrypted or plain):
read a head, build a flow, run the hooks, forward, stream the answer back.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING

from aiohttp import ClientResponse
from multidict import CIMultiDict

from proxy import errors, http1, routing, upstream, ws_frames, ws_session
from proxy.attempt_loop import forward
from proxy.bodies import BodyReader
from proxy.flow import Flow, Request, Response, new_request_id
from proxy.policy import Policy

if TYPE_CHECKING:
    from proxy.conn import ClientConn, Engine

log = logging.getLogger("sidekey.flow")

SMALL_BODY = 65536  # bodies up to this are read whole (request) or sent in one write (response)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Fields we never forward as-is: Host is rebuilt from the upstream URL (RFC
# 9112 §3.2.2), framing is redone by us or aiohttp, Expect is answered by us.
REQUEST_DROP = ("host", "content-length", "expect")
# RFC 8446 §5.1 (and every TLS/SSLv3 version before it): a ClientHello travels
# in a record whose first byte is ContentType handshake(22).
TLS_HANDSHAKE_RECORD = b"\x16"


class ClientGone(errors.ProxyError):
    status, code = 499, "client_closed"
    template = "the client closed the connection"


async def read_head(
    conn: ClientConn, wait: float, max_headers: int, *, first: bool = False
) -> http1.RequestHead | None:
    """None on EOF, idle timeout or a connection error: just close.

    ``first``: the opening bytes of a new plain connection. Their first byte is
    read alone, because a client that speaks TLS to this port (``HTTPS_PROXY=
    https://...``) sends a ClientHello and waits for ours: it would sit out the
    header timeout. No request line starts with a TLS record's first byte."""
    reader = conn.reader
    try:
        async with asyncio.timeout(wait):
            if first:
                lead = await reader.readexactly(1)
                if lead == TLS_HANDSHAKE_RECORD:
                    raise errors.TLSOnPlainPort()
                data = lead + await reader.readuntil(b"\r\n\r\n")
            else:
                data = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise errors.HeadersTooLarge(limit="the configured max_header_bytes") from None
    except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
        return None
    return http1.parse_request_head(data, max_headers)


async def serve(engine: Engine, conn: ClientConn, head: http1.RequestHead | None = None) -> None:
    """Serve requests until the client or we close. ``head``: already read."""
    first = True
    while True:
        if head is None:
            conn.idle = True
            if engine.draining:
                return
            limits = engine.policy.limits
            try:
                wait = limits.header_timeout if first else limits.idle_timeout
                head = await read_head(conn, wait, limits.max_headers)
            except errors.ProxyError as err:
                await send_error(conn, err, new_request_id())
                return
            finally:
                conn.idle = False
            if head is None:
                return
        # The snapshot this request keeps, whatever a reload does meanwhile.
        if not await handle(engine, conn, head, engine.policy):
            return
        head, first = None, False


def _in_tunnel(tunnel: tuple[str, int], head: http1.RequestHead) -> str:
    """The origin-form target of a request inside an intercepted CONNECT
    tunnel, whose target is the only authority."""
    host, port = tunnel
    target = head.target
    if not target.startswith("/"):
        _scheme, uhost, uport, target = routing.split_absolute(target)
        if (uhost, uport) != (host, port):
            raise errors.HostMismatch(target=routing.format_authority(host, port))
    hosts = head.headers.getall("host", ())
    if len(hosts) != 1 and head.version == "HTTP/1.1":
        raise errors.BadRequest(reason="exactly one Host header is required")
    if hosts and not routing.authority_matches(hosts[0], host, port):
        raise errors.HostMismatch(target=routing.format_authority(host, port))
    return target


def _absolute(head: http1.RequestHead) -> tuple[str, str, int, str]:
    """A plain proxy request: the absolute-form URI is the authority."""
    scheme, host, port, target = routing.split_absolute(head.target)
    # RFC 9112 §3.2: 400 for "more than one Host header field line or a Host header
    # field with an invalid field value". A valid one is replaced by the URI's (§3.2.2).
    hosts = head.headers.getall("host", ())
    if len(hosts) > 1:
        raise errors.BadRequest(reason="more than one Host header")
    if hosts:
        routing.parse_authority(hosts[0], routing.DEFAULT_PORTS[scheme])
    return scheme, host, port, target


def route(conn: ClientConn, head: http1.RequestHead, policy: Policy) -> Flow:
    """Decide where a request goes; raises ProxyError for what we refuse."""
    if conn.target is not None:
        host, port = conn.target
        target, scheme = _in_tunnel(conn.target, head), "https"
    else:
        scheme, host, port, target = _absolute(head)
    headers = http1.end_to_end(head.headers, REQUEST_DROP)
    request = Request(head.method, target, headers, host, port, http_version=head.version)
    provider = policy.match(host)
    if provider is None and (policy.unmatched == "deny" or conn.target is not None):
        # Inside a tunnel this only happens when a reload removed the provider.
        raise errors.UnmatchedDenied(host=host)
    flow = Flow(request, policy, provider, client_address=conn.peer, intercepted=conn.target is not None)
    log.debug("flow %s: %s %s matched provider %s", flow.id, head.method, host, provider.name if provider else "-")
    if provider is not None:
        caller = routing.caller_name(head.headers, policy.caller_header, conn.proxy_user)
        if caller is not None:
            flow.caller = caller
        if policy.caller_header:
            headers.popall(policy.caller_header, None)
    if provider is None:
        flow.upstream_url = routing.upstream_url(None, scheme, host, port, target)
    elif conn.target is None and port == 80:
        # plain http://provider/...: upgraded to TLS on the provider's https port
        flow.upstream_url = routing.upstream_url(provider, "https", host, 443, target)
    else:
        flow.upstream_url = routing.upstream_url(provider, "https", host, port, target)
    return flow


async def handle(engine: Engine, conn: ClientConn, head: http1.RequestHead, policy: Policy) -> bool:
    """One request; returns whether the connection may serve another."""
    limits = policy.limits
    try:
        flow = route(conn, head, policy)
        kind, length = http1.body_framing(head, limits.max_body_bytes)
    except errors.ProxyError as err:
        await send_error(conn, err, new_request_id())
        return False
    # One lookup per request; the rest only for an upgrade to a matched provider.
    upgrade = flow.provider is not None and "upgrade" in head.headers
    if upgrade and ws_frames.is_websocket_upgrade(head.method, head.version, head.headers):
        return await ws_session.serve(engine, conn, flow, kind)
    expect = head.headers.get("expect", "").lower() == "100-continue" and kind != "none"
    body = BodyReader(
        conn.reader,
        kind,
        length,
        max_bytes=limits.max_body_bytes,
        timeout=limits.body_timeout,
        on_start=CONTINUE if expect else None,
        write=conn.writer,
    )
    keep = head.keep_alive
    engine.in_flight += 1
    try:
        keep = await run_flow(engine, conn, flow, body, keep) and body.complete
    finally:
        engine.in_flight -= 1
    return keep and not engine.draining


async def run_flow(engine: Engine, conn: ClientConn, flow: Flow, body: BodyReader, keep: bool) -> bool:
    req = flow.request
    conn.head_sent = False  # once True, an error can only abort the stream
    resp: ClientResponse | None = None
    try:
        whole = _take_body(flow, body)
        if whole is not None:
            req.body = data = await whole
            req.content_length = len(data)
        await engine.addons.decide("request", flow)
        if flow.response is None:
            try:
                resp = await forward(engine, flow, body)
            except errors.ProxyError as failed:
                flow.response = _answer_failure(flow, body, failed)
            else:
                flow.response = Response(resp.status, http1.end_to_end(resp.headers))
                await engine.addons.decide("responseheaders", flow)
        if resp is None and flow.response.stream is not None:  # a local answer made while sent
            keep = await stream_local(conn, flow, flow.response.stream, keep and body.complete)
        elif flow.response.body is not None or resp is None:  # a local answer
            keep = keep and body.complete
            await send_local(conn, flow, keep)
        else:
            keep = await stream_response(engine, conn, flow, resp, keep)
        flow.timings["end"] = time.monotonic()
        flow.bytes_from_client = body.received
        await engine.addons.observe("response", flow)
        return keep
    except (errors.ProxyError, OSError) as exc:
        # Upstream errors arrive here already mapped; a raw OSError can only
        # come from writing to (or reading from) the client.
        err = exc if isinstance(exc, errors.ProxyError) else ClientGone(flow.provider_name)
        flow.error = err
        flow.timings["end"] = time.monotonic()
        if conn.head_sent or isinstance(err, ClientGone):
            # Mid-stream: the client must see a broken message, never a clean
            # end, so the transport is aborted without a terminating chunk.
            conn.writer.transport.abort()
        else:
            flow.response = Response.from_error(err)
            await send_local(conn, flow, False)
        flow.bytes_from_client = body.received
        await engine.addons.observe("error", flow)
        return False
    finally:
        if flow.attempt is not None:
            flow.attempt.release()
        if resp is not None:
            if flow.error is not None:
                resp.close()  # drop the upstream connection: it may stop generating
            else:
                resp.release()


def _take_body(flow: Flow, body: BodyReader) -> Awaitable[bytes] | None:
    """How the request body goes upstream: none; read whole (small enough to
    send in one write and to send again on a retry: the read is returned to
    await); or streamed as it arrives."""
    req = flow.request
    if body.complete:
        req.content_length = 0
    elif body.kind == "length" and body.length <= _replay_limit(flow):
        return body.read_all()
    else:
        req.body = body.iterate()
        req.content_length = body.length if body.kind == "length" else None
        if req.content_length is not None:
            req.headers["content-length"] = str(req.content_length)
    return None


def _answer_failure(flow: Flow, body: BodyReader, failed: errors.ProxyError) -> Response:
    """An addon may have left an answer for when the upstream fails (the
    cache's stale entry): it answers. Else, or when the caller's own body
    broke, the failure is raised on."""
    if not flow.metadata or body.error is not None or "error_answer" not in flow.metadata:
        raise failed
    answer: Response = flow.metadata.pop("error_answer")
    flow.metadata["error_answered"] = failed.code
    return answer


def _replay_limit(flow: Flow) -> int:
    """Bodies up to this are read whole: one upstream write, and a retry can
    send them again."""
    provider = flow.provider
    return max(SMALL_BODY, provider.retry.replay_max_bytes) if provider is not None else SMALL_BODY


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
        await writer.drain()
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
    sent = await _relay_body(writer, flow, resp, headers, chunked)
    if length is not None and sent != length:
        raise errors.UpstreamDisconnected(flow.provider_name)
    if chunked:
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    flow.bytes_to_client += sent
    return keep


async def _relay_body(writer: asyncio.StreamWriter, flow: Flow, resp: ClientResponse, headers: CIMultiDict[str],
                      chunked: bool) -> int:  # fmt: skip
    """A large or streamed body, piece by piece as it arrives; the bytes sent."""
    content = resp.content
    sent = 0
    while True:
        try:
            piece = await _upstream_read(resp, content.readany(), flow)
        except errors.ProxyError as err:
            if chunked and _wants_sse_error(flow, headers):
                # The stream died mid-answer: say so in-band for SSE clients,
                # then the caller aborts without the terminating chunk.
                event = sse_error_event(err)
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            raise
        if not piece:
            return sent
        if not sent:
            flow.timings["first_body_byte"] = time.monotonic()
        if flow.body_observer is not None:
            flow.body_observer(piece)
        sent += len(piece)
        writer.write(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
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
            event = sse_error_event(err)
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
        raise
    finally:
        flow.bytes_to_client += sent
    if chunked and not no_body:
        writer.write(b"0\r\n\r\n")
    await writer.drain()
    return keep


def _wants_sse_error(flow: Flow, headers: CIMultiDict[str]) -> bool:
    provider = flow.provider
    return (
        provider is not None
        and provider.sse_error_event
        and headers.get("content-type", "").startswith("text/event-stream")
    )


def sse_error_event(err: errors.ProxyError) -> bytes:
    """``event: error`` with our JSON error body: the openai SDK raises on a
    data object carrying ``error``, the anthropic SDK on ``event: error``."""
    return b"event: error\ndata: %s\n\n" % errors.render_error(err)


async def _upstream_read(resp: ClientResponse, aw: object, flow: Flow) -> bytes:
    try:
        return await aw  # type: ignore[misc, no-any-return]
    except asyncio.IncompleteReadError:
        raise errors.UpstreamDisconnected(flow.provider_name) from None
    except Exception as exc:  # noqa: BLE001 - mapped in one place
        raise upstream.map_error(exc, flow.provider_name) from None
