"""The HTTP client the credential sources use (Vault, OAuth2 token
endpoints): TLS always verified against the system store plus the named CA
file, and every address checked by the same guard as upstream traffic, so a
token URL cannot be pointed at a cloud metadata address.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from proxy.credentials.model import SourceError
from proxy.netguard import BlockedAddressError, Guard, GuardedResolver, is_ip_literal

TIMEOUT = aiohttp.ClientTimeout(total=10.0, connect=5.0)
MAX_BODY = 1024 * 1024  # a token or secret response is small; a larger one is refused unread


def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    if ca_bundle is not None:
        ctx.load_verify_locations(cafile=ca_bundle)
    return ctx


class StoreClient:
    """One small pool per store or token endpoint, made on first use."""

    def __init__(self, ca_bundle: str | None, guard: Guard) -> None:
        self.ca_bundle = ca_bundle
        self.guard = guard
        self._session: aiohttp.ClientSession | None = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            ctx = await asyncio.to_thread(_tls_context, self.ca_bundle)  # reads the CA file
            connector = aiohttp.TCPConnector(ssl=ctx, resolver=GuardedResolver(self.guard), limit=8)
            self._session = aiohttp.ClientSession(
                connector=connector, timeout=TIMEOUT, trust_env=False, cookie_jar=aiohttp.DummyCookieJar()
            )
        return self._session

    async def request(self, method: str, url: str, **kwargs: Any) -> tuple[int, Any]:
        """``(status, parsed JSON or None)``. Raises SourceError for anything
        that is not an answer; a body is never quoted (it may hold a secret)."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        if is_ip_literal(host):  # aiohttp skips the resolver for literals
            try:
                self.guard.check(host, (host,), parts.port or 443)
            except BlockedAddressError:
                raise SourceError(f"{host} is a blocked address (cloud metadata or sidekey itself)") from None
        session = await self._get_session()
        try:
            async with session.request(method, url, allow_redirects=False, **kwargs) as resp:
                if resp.content_length is not None and resp.content_length > MAX_BODY:
                    return resp.status, None
                raw = await resp.content.read(MAX_BODY + 1)
                status = resp.status
        except BlockedAddressError:
            raise SourceError(f"{host} resolves to a blocked address (cloud metadata or sidekey itself)") from None
        except aiohttp.ClientSSLError as exc:
            raise SourceError(f"TLS to {host} failed verification ({type(exc).__name__})") from None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise SourceError(f"{host} is unreachable ({type(exc).__name__})") from None
        if len(raw) > MAX_BODY:
            return status, None
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
