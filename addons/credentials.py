"""Credential injection: remove whatever the caller sent, set the real one.

Two halves. The ``request`` hook (first in the pipeline) removes the caller's
credentials and answers 503 when no upstream of the provider has its secret.
``inject`` is called by the forwarder on every attempt, because each attempt
may go to a different member of a key pool or to a fallback provider, each
with its own key. The caller's Authorization, x-api-key,
api-key, Proxy-Authorization (and the provider's own header or query
parameter) are removed from every request to a matched provider, whether or
not a secret is available, so a placeholder never reaches the upstream. A
provider whose secret is missing answers 503 ``credential_unavailable``;
other providers keep working.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from urllib.parse import quote

from multidict import CIMultiDict

from proxy.capabilities import SECRETS
from proxy.errors import CredentialUnavailable
from proxy.flow import Flow, Response
from proxy.policy import Policy, Provider, Target
from proxy.secrets import SecretStore

log = logging.getLogger("sidekey.credentials")


def strip_query_param(url: str, param: str) -> str:
    """Remove every ``param=...`` from the query, keeping the rest byte for byte."""
    base, sep, query = url.partition("?")
    if not sep:
        return url
    prefix = param + "="
    kept = [p for p in query.split("&") if p and not (p.startswith(prefix) or p == param)]
    return base + ("?" + "&".join(kept) if kept else "")


class CredentialInjector:
    name = "credentials"
    provides = (SECRETS,)

    def __init__(self, store: SecretStore | None = None, *, refresh_interval: float = 1.0) -> None:
        self.store = store or SecretStore()
        self.refresh_interval = refresh_interval
        self._task: asyncio.Task[None] | None = None

    async def configure(self, policy: Policy) -> None:
        refs = {(p, t): ref for p in policy.providers for t in p.targets if (ref := p.secret_of(t)) is not None}
        self.store.watch(list(dict.fromkeys(refs.values())))
        await asyncio.to_thread(self.store.refresh)
        for (p, t), ref in refs.items():
            if p.auth.type != "none" and self.store.get(ref) is None:
                # Reported at start; requests for it get a clear 503.
                name = p.name if len(p.targets) == 1 else f"{p.name}/{t.name}"
                log.warning("provider %s: credential source %s %s", name, ref.source, self.store.problem(ref))

    def running(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop(), name="sidekey-secret-refresh")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await asyncio.to_thread(self.store.refresh)
            except Exception as exc:  # noqa: BLE001 - keep the last good values
                log.error("secret refresh failed: %s", type(exc).__name__)

    async def done(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def secret_available(self, provider: Provider) -> bool:
        """Whether at least one upstream of the provider can be served."""
        targets = provider.targets
        if len(targets) == 1:  # the common case, on every request: no generator
            return self.usable(provider, targets[0])
        return any(self.usable(provider, t) for t in targets)

    def usable(self, provider: Provider, target: Target) -> bool:
        if provider.auth.type == "none":
            return True
        ref = provider.secret_of(target)  # None only if built around the loader: no key, not served
        return ref is not None and self.store.get(ref) is not None

    def request(self, flow: Flow) -> None:
        provider = flow.provider
        if provider is None:
            return  # unmatched passthrough: not ours to touch
        headers = flow.request.headers
        for name in provider.strip_headers:
            headers.popall(name, None)
        auth = provider.auth
        if auth.type == "query":
            assert flow.upstream_url is not None
            flow.upstream_url = strip_query_param(flow.upstream_url, auth.param)
            flow.request.path = strip_query_param(flow.request.path, auth.param)
        if auth.type != "none" and not self.secret_available(provider):
            flow.response = Response.from_error(CredentialUnavailable(provider.name))

    def inject(self, headers: CIMultiDict[str], url: str, provider: Provider, target: Target) -> str:
        """Set the target's credential on one attempt; returns the URL (a query
        credential is appended to it). Raises CredentialUnavailable."""
        auth = provider.auth
        if auth.type == "none":
            return url
        ref = provider.secret_of(target)
        secret = self.store.get(ref) if ref is not None else None
        if secret is None:
            raise CredentialUnavailable(provider.name)
        if auth.type == "bearer":
            headers["Authorization"] = "Bearer " + secret
        elif auth.type == "header":
            headers[auth.header] = auth.prefix + secret
        elif auth.type == "basic":
            token = base64.b64encode(f"{auth.username}:{secret}".encode("latin-1")).decode("ascii")
            headers["Authorization"] = "Basic " + token
        elif auth.type == "query":
            url += f"{'&' if '?' in url else '?'}{auth.param}={quote(secret, safe='')}"
        return url
