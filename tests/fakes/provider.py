"""A fake upstream AI provider: a real aiohttp HTTPS server on 127.0.0.1.

It has its own ``trustme`` test CA (``ca_pem_path``; whatever talks to it, e.g.
the proxy under test, must trust that CA), speaks enough of the OpenAI and
Anthropic wire formats for the official SDKs, offers generic HTTP endpoints
for proxy edge cases, and records every request it receives.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import shutil
import ssl
import tempfile
import time
import uuid
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trustme
from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from . import anthropic_wire, openai_wire, realtime_wire

PIECE = 64 * 1024  # write / read granularity of the streaming endpoints
JSON_LIMIT = 1024 * 1024  # bodies up to this size are kept for JSON parsing
_PERIOD = 251  # prime period, so a dropped or repeated 64 KiB piece shows up
_PATTERN = bytes(i % _PERIOD for i in range(PIECE + _PERIOD))
GZIP_PLAIN = json.dumps({"fake": "gzip", "items": list(range(64))}).encode()
GZIP_BODY = gzip.compress(GZIP_PLAIN, mtime=0)
GZIP_SHA256 = hashlib.sha256(GZIP_BODY).hexdigest()
_NO_BODY_STATUSES = {204, 205, 304}


def pattern_bytes(offset: int, size: int) -> bytes:
    """Bytes ``offset .. offset+size`` of the ``/bytes/{n}`` pattern (size <= 64 KiB)."""
    start = offset % _PERIOD
    return _PATTERN[start : start + size]


def bytes_sha256(n: int) -> str:
    """sha256 hex of the first ``n`` bytes served by ``/bytes/{n}``."""
    h = hashlib.sha256()
    for off in range(0, n, PIECE):
        h.update(pattern_bytes(off, min(PIECE, n - off)))
    return h.hexdigest()


@dataclass
class ReceivedRequest:
    method: str
    path: str
    query: str  # raw query string, without "?"
    headers: list[tuple[str, str]]  # as received, in order, original case
    body_size: int
    body_sha256: str
    body_json: Any | None  # parsed when the body is JSON and <= 1 MiB
    host_header: str
    sni: str | None
    time: float  # time.monotonic() at arrival
    body_complete: bool = False  # the whole body arrived (False: still reading / cut)
    client_gone: bool = False  # writing the response failed: peer disconnected
    aborted: bool = False  # the fake deliberately cut the connection (/cut, cut-after)
    body: bytes | None = None  # the body as received when <= 1 MiB (a form body, say)

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (case-insensitive), or None."""
        values = self.header_all(name)
        return values[0] if values else None

    def header_all(self, name: str) -> list[str]:
        low = name.lower()
        return [v for k, v in self.headers if k.lower() == low]


_REC = web.RequestKey("fake_received", ReceivedRequest)


async def _abort(request: web.BaseRequest) -> None:
    """Kill the connection without a clean end (no terminating chunk, no close_notify)."""
    transport = request.transport
    if transport is None:
        return
    deadline = asyncio.get_running_loop().time() + 30  # a loaded machine may take seconds
    while transport.get_write_buffer_size():  # let what was written leave the TLS layer first
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.01)
    # Close the TCP transport under TLS: it still flushes the bytes already written
    # (abort() would drop them), then FIN, without TLS close_notify.
    inner = getattr(getattr(transport, "_ssl_protocol", None), "_transport", None)
    if isinstance(inner, asyncio.BaseTransport):
        inner.close()
    else:
        transport.abort()


class FakeProvider:
    def __init__(self, *, hostname: str = "localhost", expected_key: str | None = None) -> None:
        self.hostname = hostname
        self.expected_key = expected_key
        self.stream_delay: float = 0.0
        self.stream_gate: asyncio.Event | None = None
        # When set, every request waits for it after its body is read (tests of
        # requests in flight at the same time: coalescing).
        self.hold: asyncio.Event | None = None
        self.openai_reply = openai_wire.OPENAI_REPLY
        self.anthropic_reply = anthropic_wire.ANTHROPIC_REPLY
        self.received: list[ReceivedRequest] = []
        self.ws_sessions: list[realtime_wire.WSSession] = []  # WebSocket sessions (/v1/realtime)
        self._flaky_counts: dict[str, int] = {}
        # Keys answered 429 as OpenAI does when a key's quota is spent (set
        # from tests through FakeProviderThread.provider; a plain set is
        # fine: only its membership is read on the fake's loop).
        self.throttled_keys: set[str] = set()
        self.down = False  # answer every request 503, as a provider outage does
        self.port = 0
        self._tmpdir = Path(tempfile.mkdtemp(prefix="fake-provider-"))
        self.ca = trustme.CA()
        self.ca_pem_path = self._tmpdir / "fake-provider-ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_pem_path))
        sans = list(dict.fromkeys([hostname, "127.0.0.1", "localhost"]))
        self._cert = self.ca.issue_cert(*sans)
        self._sni: weakref.WeakKeyDictionary[Any, str | None] = weakref.WeakKeyDictionary()
        self._runner: web.AppRunner | None = None

    # -- lifecycle -----------------------------------------------------------------

    def server_ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(ctx)
        ctx.set_alpn_protocols(["http/1.1"])
        ctx.sni_callback = self._on_sni
        return ctx

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context for clients that trusts this fake's CA."""
        return ssl.create_default_context(cafile=str(self.ca_pem_path))

    def _on_sni(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> None:
        self._sni[sslobj] = server_name

    async def start(self) -> None:
        app = web.Application(middlewares=[self._middleware])
        r = app.router
        r.add_post("/v1/chat/completions", self._chat_completions)
        r.add_post("/openai/v1/chat/completions", self._chat_completions)  # Groq's OpenAI-compatible path
        r.add_post("/v1/messages", self._messages)
        r.add_get("/v1/models", self._models)
        r.add_get("/v1/realtime", self._realtime)
        r.add_route("*", "/echo", self._echo)
        r.add_route("*", "/echo/{tail:.*}", self._echo)
        r.add_get("/redirect", self._redirect)
        r.add_get("/bytes/{n:\\d+}", self._bytes)
        r.add_post("/upload", self._upload)
        r.add_put("/upload", self._upload)
        r.add_get("/cut/{n:\\d+}", self._cut)
        r.add_route("*", "/status/{code:\\d+}", self._status)
        r.add_get("/slow-headers", self._slow_headers)
        r.add_get("/gzip", self._gzip)
        r.add_route("*", "/flaky/{name}/{n:\\d+}", self._flaky)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0, ssl_context=self.server_ssl_context())
        await site.start()
        self.port = int(self._runner.addresses[0][1])

    async def close(self) -> None:
        if self.stream_gate is not None:
            self.stream_gate.set()  # let paused streams finish instead of hanging
        if self._runner is not None:
            server = self._runner.server
            handlers = server.connections if server is not None else []
            transports = [h.transport for h in handlers if h.transport is not None]
            await self._runner.cleanup()
            self._runner = None
            for transport in transports:  # idle TLS peers never answer close_notify
                transport.abort()
            await asyncio.sleep(0)  # let connection_lost callbacks run
        shutil.rmtree(self._tmpdir, ignore_errors=True)

    async def __aenter__(self) -> FakeProvider:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- inspection ----------------------------------------------------------------

    @property
    def base_url(self) -> str:
        return f"https://localhost:{self.port}"

    def url(self, path: str) -> str:
        return self.base_url + path

    def last(self) -> ReceivedRequest:
        if not self.received:
            raise AssertionError("the fake provider has received no request")
        return self.received[-1]

    def headers_seen(self, name: str) -> list[str]:
        return [v for rec in list(self.received) for v in rec.header_all(name)]

    def arm_gate(self) -> asyncio.Event:
        """Install a fresh (unset) stream gate; call on the fake's loop."""
        self.stream_gate = asyncio.Event()
        return self.stream_gate

    def release_gate(self) -> None:
        if self.stream_gate is not None:
            self.stream_gate.set()

    # -- recording -----------------------------------------------------------------

    @web.middleware
    async def _middleware(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        ssl_obj = request.transport.get_extra_info("ssl_object") if request.transport else None
        rec = ReceivedRequest(
            method=request.method,
            path=request.path,
            query=request.query_string,
            headers=[
                (k.decode("utf-8", "surrogateescape"), v.decode("utf-8", "surrogateescape"))
                for k, v in request.raw_headers
            ],
            body_size=0,
            body_sha256=hashlib.sha256().hexdigest(),
            body_json=None,
            host_header=request.headers.get("Host", ""),
            sni=self._sni.get(ssl_obj) if ssl_obj is not None else None,
            time=time.monotonic(),
        )
        self.received.append(rec)
        request[_REC] = rec
        if not await self._consume_body(request, rec):
            return web.Response(status=400, text="request body cut\n")
        denied = self._check_key(request) or self._throttle(request)
        if denied is not None:
            return denied
        if self.hold is not None:
            await self.hold.wait()
        try:
            return await handler(request)
        except ConnectionError:
            rec.client_gone = True
            return web.Response(status=499)

    async def _consume_body(self, request: web.Request, rec: ReceivedRequest) -> bool:
        """Read the body in pieces, hashing it; keep it only when small (for JSON)."""
        h = hashlib.sha256()
        kept: bytearray | None = bytearray()
        try:
            while chunk := await request.content.read(PIECE):
                h.update(chunk)
                rec.body_size += len(chunk)
                if kept is not None and len(kept) + len(chunk) <= JSON_LIMIT:
                    kept += chunk
                else:
                    kept = None  # too big to keep: only size and hash are recorded
        except (OSError, ClientPayloadError, HttpProcessingError):  # client went away mid-body
            rec.body_sha256 = h.hexdigest()
            return False
        rec.body_sha256 = h.hexdigest()
        rec.body_complete = True
        if kept:
            rec.body = bytes(kept)
            try:
                rec.body_json = json.loads(kept)
            except ValueError:
                rec.body_json = None
        return True

    def _throttle(self, request: web.Request) -> web.Response | None:
        if self.down:
            return web.json_response(openai_wire.error_body("The server is overloaded.", type_="server_error",
                                                            code=None), status=503)  # fmt: skip
        auth = request.headers.get("Authorization", "")
        if not self.throttled_keys or auth[7:] not in self.throttled_keys:
            return None
        err = openai_wire.error_body("Rate limit reached for requests", type_="requests", code="rate_limit_exceeded")
        headers = {**_openai_headers(), "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "20s"}
        return web.json_response(err, status=429, headers=headers)

    def _check_key(self, request: web.Request) -> web.Response | None:
        key = self.expected_key
        if key is None or not request.path.startswith("/v1/"):
            return None
        auth = request.headers.get("Authorization", "")
        if request.path.startswith("/v1/messages"):
            # x-api-key is the classic Anthropic credential; anthropic SDK 2.x sends
            # the API key as "Authorization: Bearer K" instead, so accept either.
            if key == request.headers.get("x-api-key") or auth == f"Bearer {key}":
                return None
            return web.json_response(anthropic_wire.auth_error(), status=401, headers=_anthropic_headers())
        if auth == f"Bearer {key}":
            return None
        presented = auth[7:] if auth.startswith("Bearer ") else None
        return web.json_response(openai_wire.auth_error(presented), status=401, headers=_openai_headers())

    # -- provider endpoints ------------------------------------------------------------

    async def _chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = request[_REC].body_json
        if not isinstance(body, dict):
            err = openai_wire.error_body(
                "We could not parse the JSON body of your request.",
                type_="invalid_request_error",
                code=None,
            )
            return web.json_response(err, status=400, headers=_openai_headers())
        if body.get("stream") is True:
            events = openai_wire.chat_stream_events(body, self.openai_reply)
            return await self._sse(request, events, _openai_headers())
        answer = openai_wire.chat_completion(body, self.openai_reply)
        return web.json_response(answer, headers=_openai_headers())

    async def _messages(self, request: web.Request) -> web.StreamResponse:
        body = request[_REC].body_json
        if not isinstance(body, dict):
            err = {
                "type": "error",
                "error": {"type": "invalid_request_error", "message": "invalid JSON body"},
            }
            return web.json_response(err, status=400, headers=_anthropic_headers())
        if body.get("stream") is True:
            events = anthropic_wire.message_stream_events(body, self.anthropic_reply)
            return await self._sse(request, events, _anthropic_headers())
        answer = anthropic_wire.message(body, self.anthropic_reply)
        return web.json_response(answer, headers=_anthropic_headers())

    async def _realtime(self, request: web.Request) -> web.StreamResponse:
        return await realtime_wire.realtime(request, self.ws_sessions, _abort)

    async def _models(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(openai_wire.models_list(), headers=_openai_headers())

    async def _sse(self, request: web.Request, events: list[bytes], headers: dict[str, str]) -> web.StreamResponse:
        """Write SSE events one by one (each flushed), honouring the knobs;
        ``x-fake-end-with-last: 1`` sends the last event and the chunked terminator
        in one write (as nginx does), else the terminator goes on its own;
        ``x-fake-gate-at-end: 1`` moves the stream gate's wait from after the first
        event to between the last event and the terminator."""
        rec = request[_REC]
        end_with_last = request.headers.get("x-fake-end-with-last") == "1"
        gate_at = len(events) if request.headers.get("x-fake-gate-at-end") == "1" else 1
        cut = request.headers.get("x-fake-cut-after")
        cut_after = int(cut) if cut is not None else None
        resp = web.StreamResponse(headers=headers)
        resp.content_type = "text/event-stream"
        resp.charset = "utf-8"
        resp.headers["Cache-Control"] = "no-cache"
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i, event in enumerate(events):
            if cut_after is not None and i >= cut_after:
                break
            if i == gate_at and self.stream_gate is not None:
                await self.stream_gate.wait()
            if i > 0 and self.stream_delay > 0:
                await asyncio.sleep(self.stream_delay)
            if end_with_last and i == len(events) - 1:
                await resp.write_eof(event)
                return resp
            await resp.write(event)
        if cut_after is not None and cut_after < len(events):
            rec.aborted = True
            await _abort(request)
            return resp
        if gate_at == len(events) and self.stream_gate is not None:
            await self.stream_gate.wait()
        await resp.write_eof()
        return resp

    # -- generic endpoints -----------------------------------------------------------

    async def _echo(self, request: web.Request) -> web.StreamResponse:
        rec = request[_REC]
        headers: dict[str, list[str]] = {}
        for k, v in rec.headers:
            headers.setdefault(k.lower(), []).append(v)
        return web.json_response(
            {
                "method": rec.method,
                "path": rec.path,
                "query": rec.query,
                "headers": headers,
                "body_size": rec.body_size,
                "body_sha256": rec.body_sha256,
                "sni": rec.sni,
            }
        )

    async def _redirect(self, request: web.Request) -> web.StreamResponse:
        target = request.query.get("to", "/echo")
        return web.Response(status=302, headers={"Location": target}, text="redirecting\n")

    async def _bytes(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        if request.query.get("chunked") in ("1", "true", "yes"):
            resp.enable_chunked_encoding()
        else:
            resp.content_length = n
        if n <= 16 * PIECE:
            resp.headers["x-body-sha256"] = bytes_sha256(n)
        await resp.prepare(request)
        if request.method != "HEAD":
            for off in range(0, n, PIECE):
                await resp.write(pattern_bytes(off, min(PIECE, n - off)))
        await resp.write_eof()
        return resp

    async def _upload(self, request: web.Request) -> web.StreamResponse:
        rec = request[_REC]  # the middleware already streamed it through sha256
        return web.json_response({"size": rec.body_size, "sha256": rec.body_sha256})

    async def _cut(self, request: web.Request) -> web.StreamResponse:
        n = int(request.match_info["n"])
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        resp.content_length = 2 * n
        await resp.prepare(request)
        for off in range(0, n, PIECE):
            await resp.write(pattern_bytes(off, min(PIECE, n - off)))
        request[_REC].aborted = True
        await _abort(request)
        return resp

    async def _status(self, request: web.Request) -> web.StreamResponse:
        code = int(request.match_info["code"])
        if not 200 <= code <= 599:
            return web.json_response({"error": "status must be 200..599"}, status=400)
        if code in _NO_BODY_STATUSES:
            return web.Response(status=code)
        return web.json_response({"status": code}, status=code)

    async def _flaky(self, request: web.Request) -> web.StreamResponse:
        """The first n requests for ``name`` fail with ?status= (default 503)
        and the rate-limit headers named in the query; later ones succeed."""
        name = request.match_info["name"]
        seen = self._flaky_counts[name] = self._flaky_counts.get(name, 0) + 1
        if seen > int(request.match_info["n"]):
            return web.json_response({"attempt": seen})
        headers = {h: request.query[q] for q, h in _FLAKY_HEADERS.items() if q in request.query}
        return web.json_response(
            {"error": {"attempt": seen}}, status=int(request.query.get("status", "503")), headers=headers
        )

    async def _slow_headers(self, request: web.Request) -> web.StreamResponse:
        delay = float(request.query.get("delay", "1"))
        await asyncio.sleep(delay)
        return web.json_response({"delayed": delay})

    async def _gzip(self, request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=GZIP_BODY,
            headers={
                "Content-Type": "application/json",
                "Content-Encoding": "gzip",
                "x-raw-sha256": GZIP_SHA256,
            },
        )


_FLAKY_HEADERS = {
    "retry_after": "Retry-After",
    "retry_after_ms": "retry-after-ms",
    "reset_requests": "x-ratelimit-reset-requests",
    "anthropic_reset": "anthropic-ratelimit-requests-reset",
}


def _openai_headers() -> dict[str, str]:
    return {"x-request-id": "req_" + uuid.uuid4().hex, "openai-processing-ms": "1"}


def _anthropic_headers() -> dict[str, str]:
    return {"request-id": "req_" + uuid.uuid4().hex}


# The blocking-test wrapper lives in its own module; re-exported here for convenience.
from .provider_thread import FakeProviderThread  # noqa: E402

__all__ = ["FakeProvider", "FakeProviderThread", "ReceivedRequest", "bytes_sha256", "pattern_bytes"]
