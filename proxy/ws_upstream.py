"""The upstream side of a WebSocket upgrade: a dedicated connection (never
pooled: after a 101 it belongs to one session), opened to an address the
network guard allows, with the same verified TLS as the pools
(``upstream.client_tls_context``), and the upgrade request written by us.

``connect`` is what the forwarder calls instead of the pools' send when a
flow is an upgrade (``attempt_loop._send``), so member choice, the credential,
retries on connect failures and the circuit are the ones HTTP requests get.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy import errors, netguard, routing
from proxy.upstream import client_tls_context
from proxy.ws_frames import BadResponse, ResponseHead, parse_response_head

if TYPE_CHECKING:
    from proxy.ca_bundles import CABundle
    from proxy.conn import Engine
    from proxy.flow import Flow
    from proxy.policy import Provider

log = logging.getLogger("sidekey.websocket")

MAX_HEAD = 65536
MAX_ERROR_BODY = 65536  # a refusal's body (401, 429, ...) is relayed when it is at most this long
_CONTEXTS: dict[CABundle | None, ssl.SSLContext] = {}  # one per trust (a context loads the system store)

# OpenSSL's X509_V_ERR_* codes in our words (as proxy.upstream reports them for pools).
_VERIFY_REASONS = {
    10: "the certificate has expired",
    18: "the certificate is self-signed and not trusted",
    19: "a self-signed certificate in the chain is not trusted",
    20: "the issuer is not in the trusted CAs",
    62: "the certificate does not name the host",
    64: "the certificate does not name the IP address",
}


class UpgradeResponse:
    """The upstream's answer to an upgrade: what the forwarder reads of an
    aiohttp ClientResponse (status, headers, release, close), plus the
    connection, which the session takes after a 101."""

    def __init__(self, head: ResponseHead, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.head = head
        self.status = head.status
        self.reason = head.reason
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(head.headers)
        self.reader = reader
        self.writer = writer

    def release(self) -> None:
        """Not pooled: releasing is closing."""
        self.close()

    def close(self) -> None:
        if not self.writer.is_closing():
            self.writer.transport.abort()

    async def read_body(self) -> bytes | None:
        """A refusal's body when its length is known and small; None otherwise."""
        length = self.headers.get("content-length", "")
        if not length.isdigit() or int(length) > MAX_ERROR_BODY:
            return None
        return await self.reader.readexactly(int(length))

    def __repr__(self) -> str:
        return f"UpgradeResponse({self.status})"


def _context(bundle: CABundle | None) -> ssl.SSLContext:
    ctx = _CONTEXTS.get(bundle)
    if ctx is None:
        if len(_CONTEXTS) > 64:  # CA files that changed content: old contexts go
            _CONTEXTS.clear()
        ctx = _CONTEXTS[bundle] = client_tls_context(bundle)
    return ctx


def request_head(flow: Flow, url: URL, headers: CIMultiDict[str] | None = None) -> bytes:
    """The upgrade request as it goes upstream: the attempt's end-to-end headers
    (the flow's unless given; credential injected, caller's stripped), Host from
    the URL (RFC 9112 §3.2), and the two hop-by-hop fields the handshake needs
    (RFC 6455 §4.1)."""
    fields = flow.request.headers if headers is None else headers
    authority = routing.format_authority(url.raw_host or "", url.port or 443)
    lines = [f"GET {url.raw_path_qs} HTTP/1.1", f"host: {authority}"]
    lines += [f"{k}: {v}" for k, v in fields.items() if k.lower() != "content-length"]
    lines += ["upgrade: websocket", "connection: Upgrade", "", ""]
    return "\r\n".join(lines).encode("latin-1")


async def connect(engine: Engine, flow: Flow, provider: Provider | None, url: URL,
                  headers: CIMultiDict[str] | None = None) -> UpgradeResponse:  # fmt: skip
    """Open, send the upgrade, read the answer's head. Errors are ours (mapped here)."""
    name = provider.name if provider is not None else None
    if provider is None:  # the session only upgrades flows to matched providers
        raise errors.UpstreamProtocolError(name)
    host, port = url.raw_host or "", url.port or 443
    bundle = None
    if provider.tls.ca_bundle is not None:
        bundle = engine.pools.ca_bundles.get(provider.tls.ca_bundle)
        if bundle is None:
            raise errors.UpstreamTLSError(name, reason="its tls.ca_bundle holds no usable certificate")
    try:
        addresses = await netguard.resolve_checked(host, port, engine.guard)
    except netguard.BlockedAddressError:
        raise errors.AddressBlocked(name, host=host) from None
    except OSError:
        raise errors.UpstreamConnectError(name) from None
    timeouts = provider.timeouts
    reader, writer = await _open(provider, addresses, port, _context(bundle), provider.tls.server_name or host)
    try:
        writer.write(request_head(flow, url, headers))
        async with asyncio.timeout(timeouts.read):
            data = await reader.readuntil(b"\r\n\r\n")
        head = parse_response_head(data)
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.transport.abort()
        raise errors.UpstreamDisconnected(name) from None
    except TimeoutError:
        writer.transport.abort()
        raise errors.UpstreamTimeout(name) from None
    except (asyncio.LimitOverrunError, BadResponse, ValueError, OSError):
        writer.transport.abort()
        raise errors.UpstreamProtocolError(name) from None
    except BaseException:
        writer.transport.abort()
        raise
    return UpgradeResponse(head, reader, writer)


async def _open(provider: Provider, addresses: list[tuple[int, str]], port: int, ctx: ssl.SSLContext,
                server_name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:  # fmt: skip
    """A verified TLS connection to the first checked address that takes one."""
    name = provider.name
    for _family, address in addresses:  # the checked address only, never a second lookup
        try:
            async with asyncio.timeout(provider.timeouts.connect):
                return await asyncio.open_connection(address, port, ssl=ctx, server_hostname=server_name,
                                                     limit=MAX_HEAD)  # fmt: skip
        except ssl.SSLCertVerificationError as exc:
            raise errors.UpstreamTLSError(name, reason=_verify_reason(exc)) from None
        except ssl.SSLError as exc:
            raise errors.UpstreamTLSError(name, reason=f"the handshake failed ({type(exc).__name__})") from None
        except (OSError, TimeoutError):
            continue
    raise errors.UpstreamConnectError(name)


def _verify_reason(exc: ssl.SSLCertVerificationError) -> str:
    code = exc.verify_code
    return _VERIFY_REASONS.get(code, f"the certificate was refused (X509 error {code})")
