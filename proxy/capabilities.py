"""What an addon offers the engine and the admin API besides hooks, as typed
capabilities: an addon lists the ones it offers in ``provides``, and
``AddonManager.capability(SECRETS)`` hands back the first such addon typed as
the capability's protocol (or None), so a caller is checked by mypy instead
of probing attributes by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

from multidict import CIMultiDict

from proxy.policy import Provider, SecretRef, Target

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from proxy.flow import Flow
    from proxy.policy.rates import Usage

T = TypeVar("T")


@dataclass(frozen=True, slots=True, eq=False)
class Capability(Generic[T]):
    """A named capability; ``T`` is the protocol its holder satisfies."""

    name: str

    def of(self, addon: object) -> T:
        return cast(T, addon)

    def __repr__(self) -> str:
        return f"Capability({self.name})"


class Secrets(Protocol):
    """Provider credentials: whether they are there, and setting one on a request."""

    def secret_available(self, provider: Provider) -> bool: ...

    def usable(self, provider: Provider, target: Target) -> bool: ...

    def inject(self, headers: CIMultiDict[str], url: str, provider: Provider, target: Target) -> str: ...

    def credential_digest(self, provider: Provider, target: Target, key: bytes) -> str | None:
        """HMAC-SHA256 (hex) of the member's credential under ``key``: whose answer
        it is, without the secret leaving the credentials addon. None: none there."""
        ...

    async def reread(self, provider: Provider, target: Target) -> bool:
        """The upstream refused the member's credential: re-read it; True when it changed."""
        ...

    def credential_views(self, provider: Provider) -> list[dict[str, Any]]:
        """Each credential the provider injects: source, state, expiry, refreshes; never a value."""
        ...

    async def refresh_credentials(self, provider: Provider | None) -> list[dict[str, Any]]:
        """Re-read now (one provider's, or every one's); what each re-read gave."""
        ...

    def reference_value(self, ref: SecretRef) -> str | None:
        """The current value of any reference (static or cached), without waiting; None: not there."""
        ...

    async def ensure(self, refs: list[SecretRef]) -> None:
        """Wait for the first fetch of each dynamic reference that has no value yet."""
        ...


class UsageReport(Protocol):
    """Requests, tokens and cost counted so far; raises ValueError for a bad ``since``."""

    def usage_report(self, provider: str | None = None, since: str | None = None) -> dict[str, Any]: ...


class MetricsExposition(Protocol):
    """The Prometheus text exposition of everything counted."""

    def exposition(self) -> bytes: ...


class CacheAdmin(Protocol):
    """The response cache's operations: what it holds, and removing entries."""

    async def report(self) -> dict[str, Any]: ...

    async def delete(self, provider: str | None, pattern: str) -> int:
        """Entries of ``provider`` (None: every provider) whose path matches the glob; how many went."""
        ...


class SessionTokens(Protocol):
    """Token reservations of a long-lived session's responses (a WebSocket's
    ``response.create`` / ``response.done``) in the flow's token rules."""

    def reserve_tokens(self, flow: Flow, tokens: int) -> None: ...

    def settle_tokens(self, flow: Flow, reserved: int, used: int) -> None: ...


class SessionUsage(Protocol):
    """One response of a long-lived session, recorded in the usage ledger as a request of its own;
    its cost in USD (None: unpriced)."""

    def record_usage(self, flow: Flow, usage: Usage) -> float | None: ...


class CachedUsage(Protocol):
    """A request the response cache answered (a hit, a coalesced follower), recorded in
    the usage ledger as ``cached`` with the cost it saved: never as a request or spend."""

    def record_cached(self, flow: Flow, saved_usd: float) -> None: ...


class CachedRequests(Protocol):
    """A cached answer counted in the caller's request rules (``cache.count_hits: caller``):
    an awaitable when it must wait; over a rule it sets the flow's 429."""

    def count_cached(self, flow: Flow) -> Awaitable[None] | None: ...


SECRETS: Capability[Secrets] = Capability("secrets")
CACHE_ADMIN: Capability[CacheAdmin] = Capability("cache_admin")
USAGE_REPORT: Capability[UsageReport] = Capability("usage_report")
METRICS: Capability[MetricsExposition] = Capability("metrics")
SESSION_TOKENS: Capability[SessionTokens] = Capability("session_tokens")
SESSION_USAGE: Capability[SessionUsage] = Capability("session_usage")
CACHED_USAGE: Capability[CachedUsage] = Capability("cached_usage")
CACHED_REQUESTS: Capability[CachedRequests] = Capability("cached_requests")
