"""A flow: one request through sidekey, from head read to last byte sent.

Addons see and change flows in their hooks. A flow keeps the policy snapshot
it started with, so a reload mid-request cannot change its rules.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

from proxy.errors import ERROR_HEADER, ProxyError, reason_phrase, render_error
from proxy.policy import Policy, Provider

if TYPE_CHECKING:
    from proxy.attempt import Attempt
    from proxy.balance import UpstreamState
    from proxy.ws_relay import WebSocketSession

Body = bytes | AsyncIterator[bytes] | None


class Request:
    """The request as it will be sent upstream (hop-by-hop fields removed)."""

    __slots__ = ("method", "path", "http_version", "headers", "host", "port", "body", "content_length")

    def __init__(
        self,
        method: str,
        path: str,
        headers: CIMultiDict[str],
        host: str,
        port: int,
        *,
        http_version: str = "HTTP/1.1",
        body: Body = None,
        content_length: int | None = 0,
    ) -> None:
        self.method = method
        self.path = path  # origin-form: "/v1/chat/completions?x=1"
        self.http_version = http_version
        self.headers = headers
        self.host = host  # the authority the caller addressed (CONNECT target)
        self.port = port
        self.body = body  # bytes when small, else an async iterator of chunks
        self.content_length = content_length  # None: chunked, length unknown

    def __repr__(self) -> str:  # never headers: they carry credentials
        return f"Request({self.method} {self.host}:{self.port} {self.path.split('?')[0]})"


class Response:
    """The response as it will be sent to the caller.

    For a local reply (an addon answering, an error) ``body`` holds the bytes,
    or ``stream`` yields them (an answer produced while it is sent: a cache
    follower). For an upstream response the engine streams the body; both
    are None.
    """

    __slots__ = ("status", "headers", "body", "reason", "stream")

    def __init__(
        self,
        status: int,
        headers: CIMultiDict[str] | None = None,
        body: bytes | None = None,
        reason: bytes | None = None,
        stream: AsyncIterator[bytes] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers if headers is not None else CIMultiDict()
        self.body = body
        self.reason = reason  # None: the standard phrase for the status
        self.stream = stream  # a local body sent as it comes: chunked, or framed by its content-length

    @classmethod
    def make(cls, status: int, body: bytes = b"", content_type: str = "application/json") -> Response:
        return cls(status, CIMultiDict({"content-type": content_type}), body)

    @classmethod
    def from_error(cls, err: ProxyError) -> Response:
        resp = cls.make(err.status, render_error(err))
        resp.reason = reason_phrase(err)
        resp.headers[ERROR_HEADER] = err.code
        if err.status in (429, 503) and err.retryable:
            resp.headers["retry-after"] = str(err.fields.get("seconds", 1))
        return resp

    def __repr__(self) -> str:
        return f"Response({self.status})"


class ObserverTee:
    """A ``body_observer`` that records the pieces and passes them on to the
    observer it replaced (``inner``); readers of an observer unwrap it."""

    __slots__ = ("inner",)

    def __init__(self, inner: Callable[[bytes], None] | None) -> None:
        self.inner = inner


def new_request_id() -> str:
    return os.urandom(12).hex()


class Flow:
    __slots__ = (
        "id",
        "client_address",
        "policy",
        "provider",
        "request",
        "upstream_url",
        "upstream_state",
        "attempt",
        "caller",
        "body_observer",
        "response",
        "error",
        "intercepted",
        "timings",
        "metadata",
        "bytes_to_client",
        "bytes_from_client",
        "websocket",
    )

    def __init__(
        self,
        request: Request,
        policy: Policy,
        provider: Provider | None,
        *,
        client_address: tuple[str, int] | None = None,
        intercepted: bool = True,
        request_id: str | None = None,
    ) -> None:
        self.id = request_id or new_request_id()
        self.client_address = client_address
        self.policy = policy
        self.provider = provider
        self.request = request
        # Where the forwarder sends it; set by the engine from the provider,
        # addons may rewrite it (query credentials, failover).
        self.upstream_url: str | None = None
        # The upstream member that answered (set by the forwarder); its
        # in-flight count is released when the response ends.
        self.upstream_state: UpstreamState | None = None
        # That member's attempt: its in-flight lease, released with the response.
        self.attempt: Attempt | None = None
        # Who is calling, for per-caller limits and usage: the policy's caller
        # header, else the Proxy-Authorization user, else the client address.
        self.caller = client_address[0] if client_address else "-"
        # Called with every response body piece sent to the client (the usage
        # meter sets it in ``responseheaders``); must be cheap and never raise.
        self.body_observer: Callable[[bytes], None] | None = None
        self.response: Response | None = None
        self.error: ProxyError | None = None
        self.intercepted = intercepted  # False: plain-HTTP absolute-form request
        # monotonic seconds: "start", "request_sent", "response_headers",
        # "first_body_byte" (streamed bodies), "end"
        self.timings: dict[str, float] = {"start": time.monotonic()}
        self.metadata: dict[str, Any] = {}
        self.bytes_to_client = 0  # response body bytes
        self.bytes_from_client = 0  # request body bytes
        # A WebSocket upgrade's session (``proxy.ws_relay.WebSocketSession``); None for every other request.
        self.websocket: WebSocketSession | None = None

    @property
    def provider_name(self) -> str | None:
        return self.provider.name if self.provider else None

    @property
    def status(self) -> int | None:
        """The status the caller got: ours on an error, None if nothing was sent."""
        if self.response is not None:
            return self.response.status
        return self.error.status if self.error is not None else None

    @property
    def duration_ms(self) -> float | None:
        """Milliseconds from the request head to the last byte (None until it ended)."""
        start, end = self.timings.get("start"), self.timings.get("end")
        return round((end - start) * 1000, 1) if start is not None and end is not None else None

    def __repr__(self) -> str:
        status = self.response.status if self.response else "-"
        return f"Flow({self.id} {self.provider_name} {self.request!r} -> {status})"
