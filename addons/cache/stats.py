"""Counts the cache keeps, and the Prometheus families made from them at scrape time.

Labels are bounded: provider names come from the policy, results are the
fixed set below.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from addons.cache.backends import Backends

RESULTS = ("hit", "miss", "stale", "coalesced", "bypass", "error")


class CacheStats:
    __slots__ = ("counts", "saved_usd", "waits")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        self.saved_usd: dict[str, float] = {}
        self.waits: dict[str, int] = {}  # followers that waited (a promoted one waits again)

    def count(self, provider: str, result: str) -> None:
        if result == "coalesced_wait":
            self.waits[provider] = self.waits.get(provider, 0) + 1
            return
        if result in RESULTS:
            key = (provider, result)
            self.counts[key] = self.counts.get(key, 0) + 1

    def saved(self, provider: str, usd: float) -> None:
        self.saved_usd[provider] = self.saved_usd.get(provider, 0.0) + usd

    def view(self, provider: str) -> dict[str, Any]:
        counts = {r: self.counts.get((provider, r), 0) for r in RESULTS}
        served = counts["hit"] + counts["stale"] + counts["coalesced"]
        looked = served + counts["miss"]
        return {**counts, "hit_ratio": round(served / looked, 4) if looked else None,
                "saved_usd": round(self.saved_usd.get(provider, 0.0), 6)}  # fmt: skip

    def collector(self, backends: Backends) -> _Collector:
        """For the metrics registry: these counts, and the sizes of the memory stores ``backends`` holds."""
        return _Collector(self, backends)


class _Collector:
    def __init__(self, stats: CacheStats, backends: Backends) -> None:
        self.stats, self.backends = stats, backends

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily("sidekey_cache_requests", "Requests to cache-enabled providers by cache result",
                                       labels=("provider", "result"))  # fmt: skip
        for (provider, result), n in sorted(self.stats.counts.items()):
            requests.add_metric((provider, result), n)
        yield requests
        saved = CounterMetricFamily("sidekey_cache_saved_usd", "What answers from the cache would have cost upstream",
                                    labels=("provider",))  # fmt: skip
        for provider, usd in sorted(self.stats.saved_usd.items()):
            saved.add_metric((provider,), usd)
        yield saved
        size = GaugeMetricFamily("sidekey_cache_bytes", "Bytes held by the memory cache", labels=("provider",))
        entries = GaugeMetricFamily("sidekey_cache_entries", "Entries in the memory cache", labels=("provider",))
        for provider, store in sorted(self.backends.memory.items()):
            size.add_metric((provider,), store.bytes)
            entries.add_metric((provider,), len(store.entries))
        yield size
        yield entries

    def describe(self) -> Iterator[Metric]:
        return iter(())
