"""Upstream side: one long-lived aiohttp ClientSession per upstream identity,
and the single place where aiohttp exceptions become our errors.

The pool key holds everything that changes who we talk to or how we trust
them (host, port, TLS server name, the extra CA's path and content digest,
connection limits, the address allow-list), so two providers that differ in any
of those never share a connection, while providers that agree share keep-alive
connections. When a CA file's content changes, its pools are retired: new
requests get a pool that trusts the new content, and a retired pool is closed
once no request is using it. So are, after a policy reload, the pools no
provider of the new policy would pick (an upstream, pool setting, server name,
CA file or address allow-list changed): before, each such reload left its old
pools open for good (73 after 200 reloads).
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
from multidict import CIMultiDict
from yarl import URL

from proxy import errors
from proxy.balance import UpstreamState
from proxy.ca_bundles import CABundle, CABundles
from proxy.flow import Body, Flow
from proxy.netguard import BlockedAddressError, Guard, GuardedResolver, is_ip_literal
from proxy.policy import Policy, Provider

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
    ca_bundle: CABundle | None  # compared by path and digest
    max_connections: int
    keepalive_timeout: float
    guard: Guard


def pool_key(
    provider: Provider | None, scheme: str, host: str, port: int, guard: Guard, ca_bundle: CABundle | None = None
) -> PoolKey:
    if provider is None:
        return PoolKey(scheme, host, port, None, None, 100, 30.0, guard)
    return PoolKey(
        scheme,
        host,
        port,
        provider.tls.server_name,
        ca_bundle,
        provider.pool.max_connections,
        provider.pool.keepalive_timeout,
        guard,
    )


def client_tls_context(ca_bundle: CABundle | None) -> ssl.SSLContext:
    """Verification is always on: system store, plus the policy's extra CA
    (the content the pool key's digest names, not the file as it is now)."""
    ctx = ssl.create_default_context()
    if ca_bundle is not None:
        ctx.load_verify_locations(cadata=ca_bundle.pem)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def ca_paths(policy: Policy) -> list[str]:
    return [p.tls.ca_bundle for p in policy.providers if p.tls.ca_bundle is not None]


def _in_use(session: ClientSession) -> int:
    """Connections a request holds (or is opening) in this pool."""
    return len(getattr(session.connector, "_acquired", ()))


def _idle(session: ClientSession) -> int:
    """Keep-alive connections waiting in this pool."""
    return sum(len(v) for v in getattr(session.connector, "_conns", {}).values())


def reachable(key: PoolKey, policy: Policy, guard: Guard) -> bool:
    """Whether a request under ``policy`` could still use the pool ``key``: an unmatched
    passthrough's, or a provider's with the same settings and one of its upstreams
    (a host the provider matches, when a member goes to the CONNECT target)."""
    if key.guard != guard:
        return False
    if key == pool_key(None, key.scheme, key.host, key.port, guard):
        return True
    bundle_path = key.ca_bundle.path if key.ca_bundle is not None else None
    for p in policy.providers:
        if p.tls.ca_bundle != bundle_path or pool_key(p, key.scheme, key.host, key.port, guard, key.ca_bundle) != key:
            continue
        for t in p.targets:
            up = t.upstream or p.upstream
            if (up.host, up.port) == (key.host, key.port) if up else policy.match(key.host) is p:
                return True
    return False


class UpstreamPools:
    def __init__(self, *, read_bufsize: int = 2**16) -> None:
        self._sessions: dict[PoolKey, ClientSession] = {}
        self._retiring: list[ClientSession] = []  # closed once no request uses them
        # The policy of the last reload, and the pools made since: a flow that began before
        # the reload may still make one for the old policy, checked at the next upkeep.
        self._current: tuple[Policy, Guard] | None = None
        self._fresh: list[PoolKey] = []
        self._empty: set[PoolKey] = set()  # pools without a connection at the last upkeep
        # One client TLS context per trust (the system store, plus a CA file's content): a
        # context loads the whole system store, ~0.9 MB, and a provider that follows the
        # CONNECT target has a pool per host (500 hosts took RSS from 66 to 505 MB).
        self._tls: dict[CABundle | None, ssl.SSLContext] = {}
        self._timeouts: dict[tuple[float, float], ClientTimeout] = {}
        self._read_bufsize = read_bufsize
        self.ca_bundles = CABundles()

    def key(self, provider: Provider | None, scheme: str, host: str, port: int, guard: Guard) -> PoolKey:
        """The pool identity for a request now: one dict read for the CA
        content (``maintain`` keeps it current off the request path)."""
        bundle = None
        if provider is not None and provider.tls.ca_bundle is not None:
            bundle = self.ca_bundles.get(provider.tls.ca_bundle)
            if bundle is None:  # never readable since the policy named it (logged by the refresh)
                raise errors.UpstreamTLSError(provider.name, reason="its tls.ca_bundle holds no usable certificate")
        return pool_key(provider, scheme, host, port, guard, bundle)

    async def maintain(self, *policies: Policy) -> None:
        """Close retired pools that no request uses any more (retired at least
        one call ago, so a request that took its session just before is in the
        pool's count by now), re-read the CA files the policies name, and
        retire the pools that trust an old content."""
        drained = [s for s in self._retiring if not _in_use(s)]
        if drained:
            self._retiring = [s for s in self._retiring if s not in drained]
            await asyncio.gather(*(s.close() for s in drained), return_exceptions=True)
        if self._fresh and self._current is not None:
            fresh, self._fresh = self._fresh, []
            self._retire([k for k in fresh if k in self._sessions and not reachable(k, *self._current)])
        # A pool with no connection at two upkeeps in a row holds nothing worth keeping (its
        # keep-alive connections have expired): closed, so pools are bounded by connections,
        # not by the hosts ever seen. A request that takes a pool holds a connection (being
        # opened, at least) from its first step; a retired pool closes only once unused.
        empty = {k for k, session in self._sessions.items() if not _in_use(session) and not _idle(session)}
        self._retire([k for k in self._empty if k in empty])
        self._empty = {k for k in empty if k in self._sessions}
        paths = [path for policy in policies for path in ca_paths(policy)]
        if not paths:
            return
        if await asyncio.to_thread(self.ca_bundles.refresh, paths):
            self._tls = {}  # pools keep the contexts they have; new pools trust the new content
            current = self.ca_bundles.get
            stale = [k for k in self._sessions if k.ca_bundle is not None and current(k.ca_bundle.path) != k.ca_bundle]
            self._retire(stale)

    def retire_unreachable(self, policy: Policy, guard: Guard) -> int:
        """After a reload: retire the pools no request under ``policy`` would pick; they
        close at the next upkeep their requests in flight have finished by. How many."""
        self._current = (policy, guard)
        stale = [k for k in self._sessions if not reachable(k, policy, guard)]
        self._retire(stale)
        return len(stale)

    def _retire(self, keys: list[PoolKey]) -> None:
        self._retiring.extend(self._sessions.pop(k) for k in keys)

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
            if self._current is not None:
                self._fresh.append(key)
        return session

    def _new_session(self, key: PoolKey) -> ClientSession:
        connector = TCPConnector(
            limit=key.max_connections,
            limit_per_host=key.max_connections,
            keepalive_timeout=key.keepalive_timeout,
            ssl=self._tls_context(key.ca_bundle) if key.scheme == "https" else False,
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

    def _tls_context(self, bundle: CABundle | None) -> ssl.SSLContext:
        ctx = self._tls.get(bundle)
        if ctx is None:
            ctx = self._tls[bundle] = client_tls_context(bundle)
        return ctx

    def timeout(self, provider: Provider | None) -> ClientTimeout:
        connect, read = (provider.timeouts.connect, provider.timeouts.read) if provider else (10.0, 300.0)
        t = self._timeouts.get((connect, read))
        if t is None:
            t = self._timeouts[(connect, read)] = ClientTimeout(
                total=None, sock_connect=connect, connect=connect, sock_read=read
            )
        return t

    async def close(self) -> None:
        sessions, self._sessions = [*self._sessions.values(), *self._retiring], {}
        self._retiring = []
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    def statistics(self) -> dict[str, Any]:
        pools = []
        for key, session in self._sessions.items():
            acquired = _in_use(session)
            idle = _idle(session)
            pools.append({"host": key.host, "port": key.port, "in_use": acquired, "idle": idle})
        return {
            "sessions": len(self._sessions),
            "retiring": len(self._retiring),
            "pools": pools,
            "ca_bundles": self.ca_bundles.statistics(),
        }

    def __repr__(self) -> str:
        return f"UpstreamPools(sessions={len(self._sessions)}, retiring={len(self._retiring)})"


async def send(
    session: ClientSession,
    flow: Flow,
    url: URL,
    limits: ClientTimeout,
    server_name: str | None,
    headers: CIMultiDict[str],
    body: Body,
) -> ClientResponse:
    """Send flow.request's method with ``headers`` and ``body`` (the attempt's)
    to ``url``; headers are in, body not yet read."""
    try:
        return await session.request(
            flow.request.method,
            url,
            headers=headers,
            data=body,
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
        return errors.UpstreamTLSError(provider, reason=tls_reason(exc))
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


# OpenSSL's X509_V_ERR_* codes seen on upstreams, in our words: a log names the
# reason from this table, never the exception's text or the certificate.
_VERIFY_REASONS = {
    2: "the issuer certificate is not trusted",
    9: "the certificate is not yet valid",
    10: "the certificate has expired",
    18: "the certificate is self-signed and not trusted",
    19: "a self-signed certificate in the chain is not trusted",
    20: "the issuer is not in the trusted CAs",
    21: "the chain cannot be verified",
    62: "the certificate does not name the host",
    64: "the certificate does not name the IP address",
}


def tls_reason(exc: BaseException) -> str:
    """Why an upstream TLS connection failed, from fixed text only."""
    if not isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"the handshake failed ({type(exc).__name__})"
    code = getattr(exc.certificate_error, "verify_code", None)
    if not isinstance(code, int):
        return "the certificate was refused"
    return _VERIFY_REASONS.get(code, f"the certificate was refused (X509 error {code})")


def log_tls_failure(err: errors.ProxyError, provider: Provider, state: UpstreamState, bundle: CABundle | None) -> None:
    """One line naming what failed and what it was checked against, so an
    operator can tell a wrong CA file from a wrong upstream."""
    if bundle is not None:
        trust = f"the system store plus tls.ca_bundle {bundle.path} (sha256 {bundle.short})"
    elif provider.tls.ca_bundle is not None:
        trust = f"nothing: tls.ca_bundle {provider.tls.ca_bundle} has no usable certificate"
    else:
        trust = "the system store only (no tls.ca_bundle)"
    log.warning("upstream %s/%s (%s:%d): TLS verification failed: %s; trusted: %s",
                provider.name, state.name, state.host, state.port, err.fields.get("reason", "-"), trust)  # fmt: skip
