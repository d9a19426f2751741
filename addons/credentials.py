"""Credential injection: remove whatever the caller sent, set the real one.

Two halves. The ``request`` hook (first in the pipeline) removes the caller's
credentials and answers 503 when no upstream of the provider has its secret.
The ``upstream_attempt`` hook sets the key on every attempt, because each
attempt may go to a different member of a key pool or to a fallback
provider, each with its own key (health checks use ``inject`` through the
``SECRETS`` capability). The caller's Authorization, x-api-key,
api-key, Proxy-Authorization (and the provider's own header or query
parameter) are removed from every request to a matched provider, whether or
not a secret is available, so a placeholder never reaches the upstream. A
provider whose secret is missing answers 503 ``credential_unavailable``
(an OAuth2 provider whose token could not be had: ``credential_refresh_failed``);
other providers keep working.

Where a value comes from is ``proxy.credentials``: a static env:/file: key is
a dict read, as it always was; a secret store's value or an OAuth2 token is
cached there and refreshed in the background. A request that finds a
dynamic credential not fetched yet waits for the one fetch in flight.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import logging
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from multidict import CIMultiDict

from proxy.attempt import Attempt
from proxy.capabilities import SECRETS
from proxy.credentials.registry import CredentialSet
from proxy.errors import CredentialRefreshFailed, CredentialUnavailable, ProxyError
from proxy.flow import Flow, Response
from proxy.netguard import Guard
from proxy.policy import STATIC_KINDS, Policy, Provider, SecretRef, Target
from proxy.secrets import SecretStore

if TYPE_CHECKING:
    from proxy.runtime import Runtime

log = logging.getLogger("sidekey.credentials")
UNINJECTED = ("none", "oauth2", "aws-sigv4")  # no value of their own to report missing at start


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
        self.creds = CredentialSet(self.store)
        self.refresh_interval = refresh_interval
        self._task: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._runtime: Runtime | None = None
        self._policy: Policy | None = None

    def setup(self, runtime: Runtime) -> None:
        self._runtime = runtime

    async def configure(self, policy: Policy) -> None:
        self._policy = policy
        refs = {(p, t): ref for p in policy.providers for t in p.targets if (ref := p.secret_of(t)) is not None}
        static = [r for r in refs.values() if r.kind in STATIC_KINDS]
        static += [r for p in policy.providers if p.auth.oauth2 is not None
                   for r in (p.auth.oauth2.client_secret, p.auth.oauth2.refresh_token)
                   if r is not None and r.kind in STATIC_KINDS]  # fmt: skip
        static += [r for p in policy.providers if p.auth.sigv4 is not None for r in p.auth.sigv4.refs()
                   if r.kind in STATIC_KINDS]  # fmt: skip
        named = [ref for p in policy.providers for _name, ref in p.placeholders]  # addons/placeholders.py
        static += [r for r in named if r.kind in STATIC_KINDS]
        self.store.watch(list(dict.fromkeys(static)))
        await asyncio.to_thread(self.store.refresh)
        # sidekey's own ports stay refused to credential fetches too (the guard the engine keeps).
        self_ports = self._runtime.guard.self_ports if self._runtime is not None else frozenset()
        fresh = self.creds.configure(policy, Guard(policy.allow_networks, self_ports))
        # Store secrets are read now, so a start or reload reports what is missing;
        # OAuth2 tokens are fetched on first use.
        fetched = (*refs.values(), *named)
        await self.creds.ensure(r for r in fetched if r.kind not in STATIC_KINDS and r.kind != "oauth2"
                                and any(e is self.creds.entries.get(r) for e in fresh))  # fmt: skip
        for (p, t), ref in refs.items():
            if p.auth.type not in UNINJECTED and self.creds.value(ref) is None:
                # Reported at start; requests for it get a clear 503.
                name = p.name if len(p.targets) == 1 else f"{p.name}/{t.name}"
                entry = self.creds.entries.get(ref)
                problem = entry.problem if entry is not None else self.store.problem(ref)
                log.warning("provider %s: credential source %s %s", name, ref.source, problem)
        for p in policy.providers:
            for placeholder, ref in p.placeholders:
                if self.reference_value(ref) is None:
                    entry = self.creds.entries.get(ref)
                    problem = entry.problem if entry is not None else self.store.problem(ref)
                    log.warning("provider %s: placeholder %s: credential source %s %s", p.name, placeholder,
                                ref.source, problem)  # fmt: skip

    def running(self) -> None:
        self._task = asyncio.create_task(self._refresh_loop(), name="sidekey-secret-refresh")
        self._refresher = asyncio.create_task(self.creds.run(), name="sidekey-credential-refresh")

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_interval)
            try:
                await asyncio.to_thread(self.store.refresh)
            except Exception as exc:  # noqa: BLE001 - keep the last good values
                log.error("secret refresh failed: %s", type(exc).__name__)

    async def done(self) -> None:
        for task in (self._task, self._refresher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.creds.close()

    def secret_available(self, provider: Provider) -> bool:
        """Whether at least one upstream of the provider can be served."""
        targets = provider.targets
        if len(targets) == 1:  # the common case, on every request: no generator
            return self.usable(provider, targets[0])
        return any(self.usable(provider, t) for t in targets)

    def usable(self, provider: Provider, target: Target) -> bool:
        if provider.auth.type == "none" or provider.auth.type == "aws-sigv4":  # signed by addons.signing
            return True
        ref = provider.secret_of(target)  # None only if built around the loader: no key, not served
        if ref is None:
            return False
        # A static key is one dict read, as before; only a miss asks the credential set.
        return self.store.get(ref) is not None or (ref.kind not in STATIC_KINDS and self.creds.value(ref) is not None)

    def value(self, provider: Provider, target: Target) -> str | None:
        """The member's current credential, from whichever source it names."""
        ref = provider.secret_of(target)
        if ref is None:
            return None
        secret = self.store.get(ref)
        if secret is None and ref.kind not in STATIC_KINDS:
            secret = self.creds.value(ref)
        return secret

    def _refs(self, provider: Provider) -> dict[SecretRef, list[str]]:
        """The references a provider injects, each with the members using it
        (none for a source only its placeholders name)."""
        out: dict[SecretRef, list[str]] = {}
        if provider.auth.type != "none":
            for t in provider.targets:
                if (ref := provider.secret_of(t)) is not None:
                    out.setdefault(ref, []).append(t.name)
        if provider.auth.sigv4 is not None:  # one AWS key signs for every member
            for ref in provider.auth.sigv4.refs():
                out[ref] = [t.name for t in provider.targets]
        for _name, ref in provider.placeholders:
            out.setdefault(ref, [])
        return out

    def reference_value(self, ref: SecretRef) -> str | None:
        """The current value of any reference (static or cached), without waiting."""
        secret = self.store.get(ref)
        if secret is None and ref.kind not in STATIC_KINDS:
            secret = self.creds.value(ref)
        return secret

    async def ensure(self, refs: list[SecretRef]) -> None:
        """Wait for the first fetch of each dynamic reference that has no value yet."""
        await self.creds.ensure(refs)

    def credential_views(self, provider: Provider) -> list[dict[str, Any]]:
        views = []
        for ref, members in self._refs(provider).items():
            entry = self.creds.entries.get(ref)
            view: dict[str, Any] = {"source": ref.source, "kind": ref.kind, "members": members}
            if named := [name for name, r in provider.placeholders if r == ref]:
                view["placeholders"] = named
            if entry is None:  # static: read from the environment or a file, no expiry
                view.update(state="fresh" if self.store.get(ref) is not None else "failing", expires_at=None,
                            serve_until=None, last_refresh=None, last_success=None, failures=0,
                            problem=self.store.problem(ref), refreshes={})  # fmt: skip
            else:
                p = entry.plan
                view.update(
                    state=entry.state(),
                    expires_at=entry.cred.expires_at if entry.cred is not None else None,
                    serve_until=p.usable_until if p is not None and p.usable_until != float("inf") else None,
                    last_refresh=entry.refreshed_at, last_success=entry.fetched_at, failures=entry.failures,
                    problem=entry.problem, refreshes={"ok": entry.counts["ok"], "error": entry.counts["error"]},
                )  # fmt: skip
            if provider.auth.oauth2 is not None:
                view["token_url"] = provider.auth.oauth2.token_url
            views.append(view)
        return views

    async def refresh_credentials(self, provider: Provider | None) -> list[dict[str, Any]]:
        providers = [provider] if provider is not None else list(self._policy.providers if self._policy else ())
        out = []
        for p in providers:
            for source, result, state in await self.creds.refresh(list(self._refs(p))):
                out.append({"provider": p.name, "source": source, "result": result, "state": state})
        return out

    def credential_digest(self, provider: Provider, target: Target, key: bytes) -> str | None:
        """HMAC-SHA256 (hex) of the member's credential under ``key`` (the
        response cache names entries by it); the secret stays here."""
        secret = self.value(provider, target) if provider.auth.type != "none" else None
        sigv4 = provider.auth.sigv4
        if sigv4 is not None and sigv4.access_key_id is not None:  # whose answer: the AWS key (its id names it)
            secret = self.reference_value(sigv4.access_key_id)
        return hmac.new(key, secret.encode(), hashlib.sha256).hexdigest() if secret is not None else None

    async def reread(self, provider: Provider, target: Target) -> bool:
        """The upstream refused this member's credential (401/403): re-read it
        (a rotated key, a revoked token). True when there is a new value."""
        if provider.auth.sigv4 is not None:  # an AWS key: any of its parts may have been rotated
            return any([await self.creds.reread(ref) for ref in provider.auth.sigv4.refs()])
        ref = provider.secret_of(target) if provider.auth.type != "none" else None
        return ref is not None and await self.creds.reread(ref)

    def request(self, flow: Flow) -> Awaitable[None] | None:
        provider = flow.provider
        if provider is None:
            return None  # unmatched passthrough: not ours to touch
        headers = flow.request.headers
        for name in provider.strip_headers:
            headers.popall(name, None)
        auth = provider.auth
        if auth.type == "query":
            assert flow.upstream_url is not None
            flow.upstream_url = strip_query_param(flow.upstream_url, auth.param)
            flow.request.path = strip_query_param(flow.request.path, auth.param)
        if auth.type != "none" and auth.type != "aws-sigv4" and not self.secret_available(provider):
            waits = [r for t in provider.targets if (r := provider.secret_of(t)) is not None and self.creds.waiting(r)]
            if waits:  # a dynamic credential not fetched yet: wait for its one fetch
                return self._first_use(flow, provider, waits)
            flow.response = Response.from_error(self.unavailable(provider))
        return None

    async def _first_use(self, flow: Flow, provider: Provider, refs: list[SecretRef]) -> None:
        await self.creds.ensure(refs)
        if not self.secret_available(provider):
            flow.response = Response.from_error(self.unavailable(provider))

    @staticmethod
    def unavailable(provider: Provider) -> ProxyError:
        if provider.auth.type == "oauth2":
            return CredentialRefreshFailed(provider.name)
        return CredentialUnavailable(provider.name)

    def upstream_attempt(self, flow: Flow, attempt: Attempt) -> None:
        """Every attempt: the member's own credential. A fallback provider's
        caller-credential headers go first (the request hook removed the
        matched provider's)."""
        provider = attempt.provider
        if provider is not flow.provider:
            headers = attempt.headers
            for name in provider.strip_headers:
                headers.popall(name, None)
        attempt.url = self.inject(attempt.headers, attempt.url, provider, attempt.member.target)

    def inject(self, headers: CIMultiDict[str], url: str, provider: Provider, target: Target) -> str:
        """Set the target's credential on one attempt; returns the URL (a query
        credential is appended to it). Raises CredentialUnavailable."""
        auth = provider.auth
        if auth.type == "none" or auth.type == "aws-sigv4":  # a signature is set last, by addons.signing
            return url
        ref = provider.secret_of(target)
        secret = self.store.get(ref) if ref is not None else None
        if secret is None and ref is not None and ref.kind not in STATIC_KINDS:
            secret = self.creds.value(ref)
        if secret is None:
            raise self.unavailable(provider)
        if auth.type == "bearer" or auth.type == "oauth2":
            headers["Authorization"] = "Bearer " + secret
        elif auth.type == "header":
            headers[auth.header] = auth.prefix + secret
        elif auth.type == "basic":
            token = base64.b64encode(f"{auth.username}:{secret}".encode("latin-1")).decode("ascii")
            headers["Authorization"] = "Basic " + token
        elif auth.type == "query":
            url += f"{'&' if '?' in url else '?'}{auth.param}={quote(secret, safe='')}"
        return url
