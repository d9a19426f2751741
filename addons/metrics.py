"""Prometheus metrics, fed from flow hooks and read from engine statistics.

Label values are bounded: provider names come from the policy, methods fold
into a fixed set, statuses into classes. No URL, host, request id or caller
string ever becomes a label. The registry is per engine (not the global
default) so tests and reloads never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from proxy import __version__
from proxy.flow import Flow
from proxy.policy import Policy

METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# Seconds: from sub-millisecond proxy overhead up to multi-minute LLM streams.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class _EngineCollector(Collector):
    """Reads live state (pools, connections) at scrape time."""

    def __init__(self, statistics: Callable[[], dict[str, Any]]) -> None:
        self._statistics = statistics

    def collect(self) -> Iterator[Metric]:
        stats = self._statistics()
        conns = GaugeMetricFamily("sidekey_client_connections", "Open client connections")
        conns.add_metric([], stats.get("open_connections", 0))
        flows = GaugeMetricFamily("sidekey_requests_in_flight", "Requests being served")
        flows.add_metric([], stats.get("in_flight", 0))
        pool = GaugeMetricFamily("sidekey_upstream_connections", "Upstream pool connections", labels=["host", "state"])
        for p in stats.get("pools", {}).get("pools", []):
            host = f"{p['host']}:{p['port']}"  # operator-configured upstreams only
            pool.add_metric([host, "in_use"], p["in_use"])
            pool.add_metric([host, "idle"], p["idle"])
        reloads = CounterMetricFamily("sidekey_policy_reloads", "Policy reloads by result", labels=["result"])
        for result, count in stats.get("reloads", {}).items():
            reloads.add_metric([result], count)
        yield from (conns, flows, pool, reloads)


class Metrics:
    name = "metrics"

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "sidekey_requests", "Requests by outcome", ["provider", "method", "status_class", "outcome"], registry=r
        )
        self.duration = Histogram(
            "sidekey_request_duration_seconds", "Whole request, first byte in to last byte out", ["provider"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.upstream = Histogram(
            "sidekey_upstream_duration_seconds", "Request sent upstream to response headers", ["provider"],
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.overhead = Histogram(
            "sidekey_overhead_seconds", "Time in sidekey before the request went upstream", ["provider"],
            buckets=OVERHEAD_BUCKETS, registry=r,
        )  # fmt: skip
        self.ttfb = Histogram(
            "sidekey_stream_first_byte_seconds", "Streamed responses: request start to first body byte sent",
            ["provider"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.bytes_out = Counter("sidekey_response_bytes", "Body bytes sent to clients", ["provider"], registry=r)
        self.bytes_in = Counter("sidekey_request_bytes", "Body bytes received from clients", ["provider"], registry=r)
        self.policy_providers = Gauge("sidekey_policy_providers", "Providers in the active policy", registry=r)
        Info("sidekey_build", "Build information", registry=r).info({"version": __version__})
        self._providers: frozenset[str] = frozenset()
        self._children: dict[tuple[str, str, str, str], Any] = {}
        self._provider_children: dict[str, tuple[Any, ...]] = {}

    def attach(self, statistics: Callable[[], dict[str, Any]]) -> None:
        """Let scrapes read the engine's live statistics."""
        self.registry.register(_EngineCollector(statistics))

    def configure(self, policy: Policy) -> None:
        self._providers = frozenset(p.name for p in policy.providers)
        self.policy_providers.set(len(policy.providers))

    def response(self, flow: Flow) -> None:
        self._observe(flow, "ok")

    def error(self, flow: Flow) -> None:
        self._observe(flow, flow.error.code if flow.error is not None else "error")

    def _observe(self, flow: Flow, outcome: str) -> None:
        provider = flow.provider_name or "unmatched"
        if provider not in self._providers and provider != "unmatched":
            provider = "other"  # a provider removed by a reload mid-flight
        method = flow.request.method if flow.request.method in METHODS else "OTHER"
        status = flow.response.status if flow.response is not None else 0
        key = (provider, method, f"{status // 100}xx" if status else "none", outcome)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.requests.labels(*key)
        child.inc()
        duration, overhead, upstream, ttfb, bytes_out, bytes_in = self._per_provider(provider)
        t = flow.timings
        start, end = t["start"], t.get("end")
        if end is not None:
            duration.observe(end - start)
        sent, headers = t.get("request_sent"), t.get("response_headers")
        if sent is not None:
            overhead.observe(sent - start)
            if headers is not None:
                upstream.observe(headers - sent)
        first = t.get("first_body_byte")
        if first is not None:
            ttfb.observe(first - start)
        if flow.bytes_to_client:
            bytes_out.inc(flow.bytes_to_client)
        if flow.bytes_from_client:
            bytes_in.inc(flow.bytes_from_client)

    def _per_provider(self, provider: str) -> tuple[Any, ...]:
        """Label children per provider, looked up once: ``labels()`` is the
        costly part of an observation on the hot path."""
        children = self._provider_children.get(provider)
        if children is None:
            children = self._provider_children[provider] = tuple(
                m.labels(provider)
                for m in (self.duration, self.overhead, self.upstream, self.ttfb, self.bytes_out, self.bytes_in)
            )
        return children
