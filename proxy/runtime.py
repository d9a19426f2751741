"""What addons may use beside the flows: the ``Runtime`` the engine hands
each addon's ``setup`` hook, instead of the whole engine.

Everything here is the engine's own (``server.Sidekey`` satisfies the
protocol); an addon keeps the reference and reads it when it needs it (Redis
is reconnected on a reload before ``configure`` runs, so read it there).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Protocol, TypeVar

if TYPE_CHECKING:
    from redis.asyncio import Redis

    from proxy.balance import Groups, Transition, UpstreamState
    from proxy.capabilities import Capability
    from proxy.netguard import Guard
    from proxy.policy import Provider
    from proxy.upstream import UpstreamPools

T = TypeVar("T")
StateListener = Callable[["UpstreamState", "Transition"], None]


class Runtime(Protocol):
    pools: UpstreamPools  # one aiohttp session per upstream identity
    groups: Groups  # every upstream member's circuit, health and load
    guard: Guard  # the address rules every upstream connection obeys
    redis: Redis | None  # shared state between sidecars, when the policy has ``redis``
    sleep: Callable[[float], Awaitable[None]]  # injected in tests, like ``random``
    random: Callable[[], float]

    def clock(self) -> float:
        """Monotonic seconds."""
        ...

    def notify(self, state: UpstreamState, changes: Sequence[Transition]) -> None:
        """Log a member's state changes and tell the listeners."""
        ...

    def capability(self, cap: Capability[T]) -> T | None:
        """The first addon offering ``cap`` (``AddonManager.capability``)."""
        ...

    def on_state_change(self, listener: StateListener) -> None:
        """Call ``listener`` on the loop whenever a member's health or circuit changes (must not block)."""
        ...

    async def probe(self, provider: Provider, state: UpstreamState, method: str, path: str) -> int:
        """One request to ``state`` as traffic would send it: the addons' ``upstream_attempt``
        hooks run on it (its credential, the provider's headers, a signature; an
        ``attempt.probe``), then the same pools and address guard; the status.
        Raises on any failure (the caller only counts it, and bounds the time)."""
        ...
