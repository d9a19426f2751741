"""Errors that become an HTTP answer to the caller.

Each class carries its status, code and retryability. Messages come from fixed
templates plus non-secret fields (provider name, host): never from ``str()`` of
an upstream exception or from a request header, because either may hold a key.
``render_error`` is the one place that turns an error into a JSON body.

Every answer sidekey makes from an error also carries the code in the status
line's reason phrase (``403 host_not_allowed``) and in ``x-sidekey-error``:
a client refused at CONNECT (curl, httpx, the SDKs) shows only the status line,
and the header tells sidekey's own 429/502/503 from an upstream's.
"""

from __future__ import annotations

import json


class ProxyError(Exception):
    status: int = 502
    code: str = "proxy_error"
    retryable: bool = False
    template: str = "the proxy could not complete the request"
    # Mid-stream: what was written (its in-band error event) is flushed to the
    # client before the abort, which would drop it (a slow coalesced follower).
    flush_before_abort: bool = False

    def __init__(self, provider: str | None = None, **fields: object) -> None:
        self.provider = provider
        self.fields = fields
        super().__init__(self.message)

    @property
    def message(self) -> str:
        return self.template.format(provider=self.provider or "-", **self.fields)


# -- the caller's request ---------------------------------------------------
class BadRequest(ProxyError):
    status, code = 400, "bad_request"
    template = "malformed request: {reason}"


class HeadersTooLarge(ProxyError):
    status, code = 431, "headers_too_large"
    template = "request header section exceeds {limit}"


class BodyTooLarge(ProxyError):
    status, code = 413, "body_too_large"
    template = "request body exceeds {limit} bytes"


class BodyTooLargeToSign(ProxyError):
    """A provider signing requests (aws-sigv4) must hash the body before
    sending it: a streamed body is held up to ``retry.replay_max_bytes``."""

    status, code = 413, "body_too_large_to_sign"
    template = "request body exceeds {limit} bytes, the most provider {provider} holds to sign a request"


class RequestTimeout(ProxyError):
    status, code = 408, "request_timeout"
    template = "the client was too slow sending the request"


class HostMismatch(ProxyError):
    # RFC 9110 §15.5.20: 421 is for a request directed at a server that is
    # not able to produce a response for the target URI's authority.
    status, code = 421, "host_mismatch"
    template = "request authority does not match the CONNECT target {target}"


class UnmatchedDenied(ProxyError):
    status, code = 403, "host_not_allowed"
    template = "no policy matches host {host} and unmatched hosts are denied"


class AddressBlocked(ProxyError):
    status, code = 403, "address_blocked"
    template = "{host} resolves to a blocked address (cloud metadata or sidekey itself)"


class TLSOnPlainPort(ProxyError):
    """A TLS ClientHello on the plain proxy port: the client was given
    ``HTTPS_PROXY=https://...``. Answered in plain HTTP, which the client's TLS
    layer reports as "wrong version number", the message people search for."""

    status, code = 400, "tls_to_plain_port"
    template = "sidekey's proxy port speaks plain HTTP: use http:// in HTTPS_PROXY"


class PlaceholderMisdirected(ProxyError):
    """A request carried a provider's placeholder to a host that provider does
    not serve (``proxy.placeholders``). Only the name and host are said: names
    are not secrets, the value was never put in."""

    status, code = 403, "placeholder_misdirected"
    template = "placeholder {placeholder} does not belong to host {host}"


class MethodNotAllowed(ProxyError):
    status, code = 405, "method_not_allowed"
    template = "{reason}"


# -- sidekey itself ---------------------------------------------------------
class WebSocketNotAllowed(ProxyError):
    status, code = 403, "websocket_not_allowed"
    template = "provider {provider} does not allow WebSocket sessions (policy: websocket: false)"


class CredentialUnavailable(ProxyError):
    status, code = 503, "credential_unavailable"
    template = "the credential for provider {provider} is not available"


class CredentialRefreshFailed(ProxyError):
    """An OAuth2 token expired and the token endpoint did not give a new one."""

    status, code, retryable = 503, "credential_refresh_failed", True
    template = "the access token for provider {provider} could not be refreshed"


class AddonFailed(ProxyError):
    status, code = 502, "addon_failed"
    template = "a sidekey addon failed while handling the request"


class ShuttingDown(ProxyError):
    status, code, retryable = 503, "shutting_down", True
    template = "sidekey is shutting down"


# -- the upstream -------------------------------------------------------------
class CircuitOpen(ProxyError):
    status, code, retryable = 503, "circuit_open", True
    template = "the upstream of provider {provider} is failing; not trying it for {seconds} s"


class UpstreamThrottled(ProxyError):
    """Every key of the provider was refused with 429 and told to wait; we do
    not send more until the upstream's own reset time (distinct from
    ``rate_limited``, a limit of sidekey's own policy)."""

    status, code, retryable = 429, "upstream_rate_limited", True
    template = "every upstream key of provider {provider} is rate limited by the provider; retry in {seconds} s"


class RateLimited(ProxyError):
    """A limit of sidekey's own policy (not the provider's 429)."""

    status, code, retryable = 429, "rate_limited", True
    template = "sidekey's {scope} limit for provider {provider} is reached; retry in {seconds} s"


class RequestOverLimit(ProxyError):
    """One request reserves more tokens than a rule allows in a whole window:
    no wait makes it fit, so a Retry-After would loop an obedient client
    forever. RFC 9110 §15.5.14: 413 is for content larger than the server is
    willing to process."""

    status, code, retryable = 413, "request_over_limit", False
    template = (
        "this request reserves {reserved} tokens, more than sidekey's {scope} limit {rule} ({limit}) for "
        "provider {provider} allows at all; set max_tokens (or max_completion_tokens / max_output_tokens) "
        "so that the prompt and the answer fit"
    )


class LimitsUnavailable(ProxyError):
    status, code, retryable = 503, "limits_unavailable", True
    template = "shared limit state is unreachable and the policy fails closed"


class UpstreamConnectError(ProxyError):
    status, code, retryable = 502, "upstream_connect_error", True
    template = "could not connect to the upstream of provider {provider}"


class UpstreamTLSError(ProxyError):
    status, code = 502, "upstream_tls_error"
    template = "the upstream of provider {provider} failed TLS verification"


class UpstreamTimeout(ProxyError):
    status, code, retryable = 504, "upstream_timeout", True
    template = "the upstream of provider {provider} did not answer in time"


class UpstreamProtocolError(ProxyError):
    status, code, retryable = 502, "upstream_protocol_error", True
    template = "the upstream of provider {provider} sent an invalid response"


class UpstreamDisconnected(ProxyError):
    status, code, retryable = 502, "upstream_disconnected", True
    template = "the upstream of provider {provider} closed the connection"


class ClientGone(ProxyError):
    """The client closed its connection (or writing to it failed) mid-request."""

    status, code = 499, "client_closed"
    template = "the client closed the connection"


def describe(exc: BaseException) -> str:
    """For logs: the exception type and where it was raised, never its
    message (an aiohttp error's text can quote a URL with a query key)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(exc).__name__}{where}"


ERROR_HEADER = "x-sidekey-error"


def reason_phrase(err: ProxyError) -> bytes:
    """The status line's reason phrase: the code (a token, so a valid
    reason-phrase under RFC 9112 §4)."""
    return err.code.encode("ascii")


def render_error(err: ProxyError) -> bytes:
    """The JSON body every error answer carries."""
    body = {
        "error": {
            "code": err.code,
            "message": err.message,
            "provider": err.provider,
            "retryable": err.retryable,
        }
    }
    return json.dumps(body, separators=(",", ":")).encode()


def sse_error_event(err: ProxyError) -> bytes:
    """``event: error`` with our JSON error body: the openai SDK raises on a
    data object carrying ``error``, the anthropic SDK on ``event: error``.
    Written by the session's writer (``proxy.responses``) and by a coalesced
    follower cut off mid-answer (``addons.cache.following``)."""
    return b"event: error\ndata: %s\n\n" % render_error(err)
