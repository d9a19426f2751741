"""The HTTP/1.1 keep-alive loop on one client stream (decrypted or plain):
read a head, build a flow, run the hooks, forward, stream the answer back
(the writing is ``proxy.responses``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from aiohttp import ClientResponse

from proxy import errors, http1, routing, ws_frames, ws_session
from proxy.attempt_loop import forward
from proxy.bodies import BodyReader
from proxy.flow import Flow, Request, Response, new_request_id
from proxy.policy import Policy
from proxy.responses import SMALL_BODY, send_error, send_local, stream_local, stream_response

if TYPE_CHECKING:
    from proxy.conn import ClientConn, Engine

log = logging.getLogger("sidekey.flow")

CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# Fields we never forward as-is: the hop-by-hop ones; Host is rebuilt from the upstream URL (RFC
# 9112 §3.2.2), framing is redone by us or aiohttp, Expect is answered by us.
REQUEST_DROP = http1.HOP_BY_HOP | {"host", "content-length", "expect"}
# RFC 8446 §5.1 (and every TLS/SSLv3 version before it): a ClientHello travels
# in a record whose first byte is ContentType handshake(22).
TLS_HANDSHAKE_RECORD = b"\x16"


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
        err = exc if isinstance(exc, errors.ProxyError) else errors.ClientGone(flow.provider_name)
        flow.error = err
        flow.timings["end"] = time.monotonic()
        if conn.head_sent or isinstance(err, errors.ClientGone):
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
