"""Upstream side: one long-lived aiohttp ClientSession per upstream identity,
and the single place where aiohttp exceptions become our errors.

The pool key holds everything that changes who we talk to or how we trust
them (host, port, TLS server name, extra CA, connection limits, the address
allow-list), so two providers that differ in any of those never share a
connection, while providers that agree share keep-alive connections.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import ssl
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import ClientResponse, ClientSession, ClientTimeout, TCPConnector
from yarl import URL

from proxy import errors
from proxy.flow import Flow
from proxy.netguard import BlockedAddressError, Guard, GuardedResolver, is_ip_literal
from proxy.policy import Provider

log = logging.getLogger("sidekey.upstream")

_CONNECTION_LOST = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ECONNABORTED})

# aiohttp adds these unless told not to; a proxy must not invent them.
SKIP_AUTO_HEADERS = frozenset({"Accept", "Accept-Encoding", "User-Agent", "Content-Type"})


@dataclass(frozen=True, slots=True)
class PoolKey:
    scheme: str  # "https" for providers; "http" only for unmatched passthrough
    host: str
    port: int
    server_name: str | None
    ca_bundle: str | None
    max_connections: int
    keepalive_timeout: float
    guard: Guard


def pool_key(provider: Provider | None, scheme: str, host: str, port: int, guard: Guard) -> PoolKey:
    if provider is None:
        return PoolKey(scheme, host, port, None, None, 100, 30.0, guard)
    return PoolKey(
        scheme,
        host,
        port,
        provider.tls.server_name,
        provider.tls.ca_bundle,
        provider.pool.max_connections,
        provider.pool.keepalive_timeout,
        guard,
    )


def client_tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verification is always on: system store, plus the policy's extra CA."""
    ctx = ssl.create_default_context()
    if ca_bundle:
        ctx.load_verify_locations(cafile=ca_bundle)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class UpstreamPools:
    def __init__(self, *, read_bufsize: int = 2**16) -> None:
        self._sessions: dict[PoolKey, ClientSession] = {}
        self._timeouts: dict[tuple[float, float], ClientTimeout] = {}
        self._read_bufsize = read_bufsize

    def session(self, key: PoolKey) -> ClientSession:
        session = self._sessions.get(key)
        if session is None or session.closed:
            # aiohttp connects to an IP literal without asking the resolver,
            # so literal addresses are checked here, once per pool.
            if is_ip_literal(key.host):
                try:
                    key.guard.check(key.host, (key.host,), key.port)
                except BlockedAddressError:
                    raise errors.AddressBlocked(host=key.host) from None
            session = self._sessions[key] = self._new_session(key)
        return session

    def _new_session(self, key: PoolKey) -> ClientSession:
        connector = TCPConnector(
            limit=key.max_connections,
            limit_per_host=key.max_connections,
            keepalive_timeout=key.keepalive_timeout,
            ssl=client_tls_context(key.ca_bundle) if key.scheme == "https" else False,
            resolver=GuardedResolver(key.guard),
            ttl_dns_cache=10,
            enable_cleanup_closed=False,
        )
        return ClientSession(
            connector=connector,
            auto_decompress=False,  # bytes pass untouched
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy keeps no cookies
            read_bufsize=self._read_bufsize,
            max_line_size=65536,
            max_field_size=65536,
            timeout=ClientTimeout(total=None),
            trust_env=False,  # never chain to HTTPS_PROXY from our own environment
            skip_auto_headers=SKIP_AUTO_HEADERS,
        )

    def timeout(self, provider: Provider | None) -> ClientTimeout:
        connect, read = (provider.timeouts.connect, provider.timeouts.read) if provider else (10.0, 300.0)
        t = self._timeouts.get((connect, read))
        if t is None:
            t = self._timeouts[(connect, read)] = ClientTimeout(
                total=None, sock_connect=connect, connect=connect, sock_read=read
            )
        return t

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    def statistics(self) -> dict[str, Any]:
        pools = []
        for key, session in self._sessions.items():
            conn = session.connector
            acquired = len(getattr(conn, "_acquired", ()))
            idle = sum(len(v) for v in getattr(conn, "_conns", {}).values())
            pools.append({"host": key.host, "port": key.port, "in_use": acquired, "idle": idle})
        return {"sessions": len(self._sessions), "pools": pools}

    def __repr__(self) -> str:
        return f"UpstreamPools(sessions={len(self._sessions)})"


async def send(
    session: ClientSession, flow: Flow, url: URL, limits: ClientTimeout, server_name: str | None
) -> ClientResponse:
    """Send flow.request to ``url``; headers are in, body not yet read."""
    req = flow.request
    try:
        return await session.request(
            req.method,
            url,
            headers=req.headers,
            data=req.body,
            allow_redirects=False,  # a 3xx goes back to the caller, never followed with our key
            timeout=limits,
            server_hostname=server_name,
        )
    except Exception as exc:  # noqa: BLE001 - mapped in one place
        raise map_error(exc, flow.provider_name) from None


def map_error(exc: BaseException, provider: str | None) -> BaseException:
    """aiohttp/asyncio exceptions to ours. Never str(exc): it may quote a URL."""
    if isinstance(exc, errors.ProxyError | asyncio.CancelledError):
        return exc
    if isinstance(exc, aiohttp.ClientConnectorDNSError) and isinstance(exc.os_error, BlockedAddressError):
        return errors.AddressBlocked(provider, host=exc.os_error.host)
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ServerFingerprintMismatch):
        return errors.UpstreamTLSError(provider)
    if isinstance(exc, aiohttp.ClientConnectorError):
        return errors.UpstreamConnectError(provider)
    if isinstance(exc, aiohttp.ServerTimeoutError | asyncio.TimeoutError | TimeoutError):
        return errors.UpstreamTimeout(provider)
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError | ConnectionError):
        return errors.UpstreamDisconnected(provider)
    if isinstance(exc, aiohttp.ClientOSError) and exc.errno in _CONNECTION_LOST:
        # aiohttp wraps a reset as ClientOSError, not ConnectionError: the
        # upstream went away, it did not send something invalid.
        return errors.UpstreamDisconnected(provider)
    if isinstance(exc, aiohttp.ClientError | ValueError | OSError):
        return errors.UpstreamProtocolError(provider)
    return exc
