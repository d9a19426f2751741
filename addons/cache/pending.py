"""A flow's cache state between its hooks (``flow.metadata["cache_state"]``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from addons.cache.flight import Flight
from addons.cache.rules import Directives
from addons.cache.stores import Entry
from proxy.policy import CachePolicy

if TYPE_CHECKING:
    from addons.cache.recorder import Recorder


class Pending:
    """What the ``request`` hook decided for a miss, read by the later hooks."""

    __slots__ = ("key", "policy", "directives", "stale", "flight", "recorder", "lock")

    def __init__(self, key: str, policy: CachePolicy, directives: Directives, stale: Entry | None,
                 flight: Flight | None) -> None:  # fmt: skip
        self.key, self.policy, self.directives, self.stale, self.flight = key, policy, directives, stale, flight
        self.recorder: Recorder | None = None
        self.lock: tuple[str, str] | None = None  # coalesce: cluster: leads across sidecars (provider, token)

    def __repr__(self) -> str:
        return f"Pending({self.key[:12]}, flight={self.flight is not None}, stale={self.stale is not None})"
