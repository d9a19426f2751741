"""``CredentialSet``: every credential the policy names, static and dynamic,
behind one lookup (``value``) that the injector, health checks, fallbacks
and key pools all use.

Static references (env:, file:) are a dict read in ``proxy.secrets``. Each
dynamic one (a store's secret, an OAuth2 token) has a ``CachedCredential``,
kept across reloads while its source is unchanged, re-read by one background
task when due. A request that finds no value waits for the single fetch in
flight (``ensure``), unless the source is backing off after failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from proxy.credentials.aws_sm import AwsSmClient, AwsSmSource
from proxy.credentials.azure_kv import AzureKvClient, AzureKvSource
from proxy.credentials.cache import CachedCredential, Outcome
from proxy.credentials.model import Source
from proxy.credentials.oauth2 import OAuth2Source
from proxy.credentials.vault import VaultClient, VaultSource
from proxy.netguard import Guard
from proxy.policy import STATIC_KINDS, Policy, Provider, SecretRef
from proxy.policy.credential_model import SecretStores, Timing
from proxy.secrets import SecretStore

log = logging.getLogger("sidekey.credentials")

# Vendor SDKs that log request and response bodies (secret values) at DEBUG,
# and every request URL at INFO (azure-core): held at WARNING whatever
# sidekey's own level is, so --log-level debug stays safe. Their failures
# reach the log as ours, from fixed phrases (proxy.credentials.cache).
VERBOSE_SDK_LOGGERS = ("botocore", "aiobotocore", "boto3", "urllib3", "azure", "msal", "hvac")


def quiet_sdk_loggers() -> None:
    for name in VERBOSE_SDK_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level < logging.WARNING:  # NOTSET (0) included: it would inherit our DEBUG
            logger.setLevel(logging.WARNING)


OAUTH2_TIMING = Timing(follow_expiry=True)
MAX_NAP = 5.0  # the refresher looks again at least this often (a new entry, a clock step)


def _dynamic_refs(policy: Policy) -> dict[SecretRef, Provider]:
    """Every dynamic reference with the first provider that uses it (an
    OAuth2 client_secret or refresh_token, a placeholder's source too)."""
    out: dict[SecretRef, Provider] = {}
    for p in policy.providers:
        refs: list[SecretRef | None] = [p.secret_of(t) for t in p.targets] if p.auth.type != "none" else []
        if p.auth.oauth2 is not None:
            refs += [p.auth.oauth2.client_secret, p.auth.oauth2.refresh_token]
        if p.auth.sigv4 is not None:
            refs += p.auth.sigv4.refs()
        refs += [ref for _name, ref in p.placeholders]
        for ref in refs:
            if ref is not None and ref.kind not in STATIC_KINDS:
                out.setdefault(ref, p)
    return out


class CredentialSet:
    def __init__(self, static: SecretStore, *, clock: Callable[[], float] = time.time) -> None:
        self.static = static
        self.clock = clock
        self.guard = Guard(())
        self.entries: dict[SecretRef, CachedCredential] = {}
        self._keys: dict[SecretRef, object] = {}  # what an entry was built from: rebuilt when it changes
        self._stores: SecretStores | None = None
        self._clients: dict[str, Any] = {}
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[Outcome]] = set()
        self._closing: list[Any] = []

    # -- the request path: synchronous, no locks --------------------------------
    def value(self, ref: SecretRef) -> str | None:
        if ref.kind in STATIC_KINDS:
            return self.static.get(ref)
        entry = self.entries.get(ref)
        return entry.value() if entry is not None else None

    def waiting(self, ref: SecretRef) -> CachedCredential | None:
        """The entry a request should wait for: dynamic, no usable value, and
        not backing off (a failing store answers 503 at once, not per request)."""
        if ref.kind in STATIC_KINDS:
            return None
        entry = self.entries.get(ref)
        if entry is None or entry.value() is not None or self.clock() < entry.next_attempt:
            return None
        return entry

    async def ensure(self, refs: Iterable[SecretRef]) -> None:
        """Wait for the fetch of each reference that has no value yet."""
        pending = [e for ref in refs if (e := self.waiting(ref)) is not None]
        if pending:
            await asyncio.gather(*(e.refresh() for e in pending))
            self._wake.set()  # the refresher plans from the new values

    async def lookup(self, ref: SecretRef) -> str | None:
        """A value for a source that needs another (an OAuth2 client secret)."""
        await self.ensure((ref,))
        return self.value(ref)

    # -- configuration ---------------------------------------------------------
    def configure(self, policy: Policy, guard: Guard | None = None) -> list[CachedCredential]:
        """Build the entries for a policy; returns the new ones (to be fetched)."""
        quiet_sdk_loggers()
        if guard is not None:
            self.guard = guard
        if policy.secret_stores != self._stores:
            self._closing.extend(self._clients.values())
            self._clients, self._stores = {}, policy.secret_stores
            self.entries, self._keys = {}, {}
        fresh: list[CachedCredential] = []
        entries: dict[SecretRef, CachedCredential] = {}
        keys: dict[SecretRef, object] = {}
        for ref, provider in _dynamic_refs(policy).items():
            key: object = (ref, provider.auth.oauth2, provider.tls.ca_bundle) if ref.kind == "oauth2" else ref
            entry = self.entries.get(ref)
            if entry is None or self._keys.get(ref) != key:
                entry = CachedCredential(*self._source(ref, provider), clock=self.clock)
                entry.lazy = ref.kind == "oauth2"
                fresh.append(entry)
            entries[ref], keys[ref] = entry, key
        self.entries, self._keys = entries, keys
        self._wake.set()
        return fresh

    def _source(self, ref: SecretRef, provider: Provider) -> tuple[Source, Timing]:
        stores = self._stores or SecretStores()
        if ref.kind == "oauth2":
            assert provider.auth.oauth2 is not None
            src = OAuth2Source(provider.name, provider.auth.oauth2, self.lookup, self.guard, provider.tls.ca_bundle)
            self._closing.append(src)  # its own pool: closed at shutdown
            return src, OAUTH2_TIMING
        if ref.kind == "vault" and stores.vault is not None:
            client = self._clients.setdefault("vault", VaultClient(stores.vault, self.guard))
            return VaultSource(client, ref), stores.vault.timing
        if ref.kind == "aws-sm" and stores.aws_sm is not None:
            client = self._clients.setdefault("aws-sm", AwsSmClient(stores.aws_sm))
            return AwsSmSource(client, ref), stores.aws_sm.timing
        if ref.kind == "azure-kv" and stores.azure_kv is not None:
            client = self._clients.setdefault("azure-kv", AzureKvClient(stores.azure_kv))
            return AzureKvSource(client, ref), stores.azure_kv.timing
        raise ValueError(f"no store for {ref.kind}: references (the loader checks this)")

    # -- background ------------------------------------------------------------
    async def run(self) -> None:
        """Re-read each entry when due, one fetch per entry at a time. OAuth2
        tokens are fetched on first use; the refresher takes over after."""
        while True:
            self._wake.clear()
            now = self.clock()
            for entry in self.entries.values():
                started = not entry.lazy or entry.plan is not None or entry.failures > 0
                if started and entry.due(now) and not entry.busy:
                    task = asyncio.create_task(entry.refresh(), name=f"sidekey-credential {entry.source.source}")
                    self._tasks.add(task)
                    task.add_done_callback(self._done)
            if not self.entries:  # static keys only: nothing to do until a reload adds some
                await self._wake.wait()
                continue
            wakes = [e.wake_at() for e in self.entries.values() if e.plan is not None or e.failures]
            nap = min([MAX_NAP, *(w - now for w in wakes)])
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), max(nap, 0.05))

    def _done(self, task: asyncio.Task[Outcome]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("credential refresh failed: %s", type(task.exception()).__name__)
        self._wake.set()

    async def refresh(self, refs: Iterable[SecretRef]) -> list[tuple[str, str, str]]:
        """Re-read now (an operator's request): ``(source, result, state)`` each."""
        out: list[tuple[str, str, str]] = []
        static = [r for r in refs if r.kind in STATIC_KINDS]
        if static:
            await asyncio.to_thread(self.static.refresh)
        for ref in dict.fromkeys(refs):
            entry = self.entries.get(ref)
            if entry is None:
                state = "fresh" if self.static.get(ref) is not None else "failing"
                out.append((ref.source, "ok" if state == "fresh" else "error", state))
                continue
            entry.invalidate()
            outcome = await entry.refresh()
            out.append((ref.source, outcome.result, entry.state()))
        self._wake.set()
        return out

    async def reread(self, ref: SecretRef) -> bool:
        """The upstream refused the value: re-read it once. True when a
        different value is now there (worth one more attempt)."""
        before = self.value(ref)
        if ref.kind == "env":
            return False  # the environment does not change under a running process
        if ref.kind == "file":
            await asyncio.to_thread(self.static.refresh)
        else:
            entry = self.entries.get(ref)
            if entry is None:
                return False
            entry.invalidate()
            await entry.refresh()
            self._wake.set()
        after = self.value(ref)
        return after is not None and after != before

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        closing, self._closing = [*self._closing, *self._clients.values()], []
        self._clients = {}
        await asyncio.gather(*(c.close() for c in closing), return_exceptions=True)

    def statistics(self) -> dict[str, int]:
        states = [e.state() for e in self.entries.values()]
        return {"dynamic": len(states), **{s: states.count(s) for s in ("fresh", "stale", "failing")}}

    def __repr__(self) -> str:
        return f"CredentialSet({self.statistics()})"
