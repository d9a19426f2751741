"""Prometheus metrics, fed from flow hooks and read from engine statistics.

Label values are bounded: provider names come from the policy, methods fold
into a fixed set, statuses into classes, outcomes are our error codes, models
are price-table names (an unpriced model is ``other``). No URL, host, request
id or caller string ever becomes a label. The registry is per
engine (not the global default) so tests and reloads never collide.

Every per-request update happens on the event loop thread, so the counters
and histograms here are plain Python numbers without the locks
prometheus-client's own metric classes take on each ``inc``/``observe``
(that locking cost more than the rest of this addon together). A collector
turns them into metric families at scrape time.
"""

from __future__ import annotations

import asyncio
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from addons.usage.tokens import Usage
from proxy import __version__
from proxy.capabilities import METRICS
from proxy.flow import Flow
from proxy.policy import Policy

TOKEN_KINDS = ("input", "output", "cached_input", "reasoning", "cache_creation")  # Usage attributes
METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"})
# Seconds: from sub-millisecond proxy overhead up to multi-minute LLM streams.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1)


class LoopHistogram:
    """Bucket counts and a sum; updated from one thread only."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def cumulative(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip((*map(str, self.bounds), "+Inf"), self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class _ProviderSeries:
    __slots__ = ("duration", "overhead", "upstream", "ttfb", "bytes_out", "bytes_in", "retries")

    def __init__(self) -> None:
        self.duration = LoopHistogram(LATENCY_BUCKETS)
        self.overhead = LoopHistogram(OVERHEAD_BUCKETS)
        self.upstream = LoopHistogram(LATENCY_BUCKETS)
        self.ttfb = LoopHistogram(LATENCY_BUCKETS)
        self.bytes_out = 0
        self.bytes_in = 0
        self.retries = 0


HISTOGRAMS = (
    ("duration", "sidekey_request_duration_seconds", "Whole request, first byte in to last byte out"),
    ("overhead", "sidekey_overhead_seconds", "Time in sidekey before the request went upstream"),
    ("upstream", "sidekey_upstream_duration_seconds", "Request sent upstream to response headers"),
    ("ttfb", "sidekey_stream_first_byte_seconds", "Streamed responses: request start to first body byte sent"),
)


class Metrics:
    name = "metrics"
    provides = (METRICS,)

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        Info("sidekey_build", "Build information", registry=self.registry).info({"version": __version__})
        self.registry.register(_FlowCollector(self))
        self.providers_in_policy = 0
        self._providers: frozenset[str] = frozenset()
        # (provider, method, status_class, outcome) -> count
        self.requests: dict[tuple[str, str, str, str], int] = {}
        self.series: dict[str, _ProviderSeries] = {}
        self.failovers: dict[tuple[str, str], int] = {}  # (matched provider, serving provider) -> count
        self.throttled: dict[tuple[str, str], int] = {}  # (provider, sidekey | upstream) -> 429s answered
        # From the usage addon's flow.metadata: by the provider that served.
        self.tokens: dict[tuple[str, str, str], int] = {}  # (provider, model, kind) -> tokens
        self.cost: dict[tuple[str, str], float] = {}  # (provider, model) -> USD
        self.estimated: dict[str, int] = {}  # provider -> requests whose usage was estimated

    def attach(self, statistics: Callable[[], dict[str, Any]]) -> None:
        """Let scrapes read the engine's live statistics."""
        self.registry.register(_EngineCollector(statistics))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def configure(self, policy: Policy) -> None:
        self._providers = frozenset(p.name for p in policy.providers)
        self.providers_in_policy = len(policy.providers)

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
        self.requests[key] = self.requests.get(key, 0) + 1
        if status == 429:  # whose limit: sidekey's own (a local answer) or the provider's
            source = (provider, "sidekey" if flow.response.body is not None else "upstream")  # type: ignore[union-attr]
            self.throttled[source] = self.throttled.get(source, 0) + 1
        series = self.series.get(provider)
        if series is None:
            series = self.series[provider] = _ProviderSeries()
        t = flow.timings
        start, end = t["start"], t.get("end")
        if end is not None:
            series.duration.observe(end - start)
        sent, headers = t.get("request_sent"), t.get("response_headers")
        if sent is not None:
            series.overhead.observe(sent - start)
            if headers is not None:
                series.upstream.observe(headers - sent)
        first = t.get("first_body_byte")
        if first is not None:
            series.ttfb.observe(first - start)
        series.bytes_out += flow.bytes_to_client
        series.bytes_in += flow.bytes_from_client
        if flow.metadata:  # retries and failovers are the uncommon case
            attempts = flow.metadata.get("attempts", 1)
            series.retries += attempts - 1
            state = flow.upstream_state
            served = provider
            if state is not None and state.provider != provider and state.provider in self._providers:
                key2 = (provider, state.provider)
                self.failovers[key2] = self.failovers.get(key2, 0) + 1
                served = state.provider
            usage = flow.metadata.get("usage")
            if usage is not None:
                self._usage(served, usage, flow.metadata)

    def _usage(self, provider: str, usage: Usage, meta: dict[str, Any]) -> None:
        model = meta.get("priced_model") or "other"
        for kind in TOKEN_KINDS:
            n = getattr(usage, kind)
            if n:
                key = (provider, model, kind)
                self.tokens[key] = self.tokens.get(key, 0) + n
        cost = meta.get("cost")
        if cost:
            self.cost[(provider, model)] = self.cost.get((provider, model), 0.0) + cost
        if usage.estimated:
            self.estimated[provider] = self.estimated.get(provider, 0) + 1


class _FlowCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        m = self._m
        requests = CounterMetricFamily(
            "sidekey_requests", "Requests by outcome", labels=["provider", "method", "status_class", "outcome"]
        )
        for key, count in list(m.requests.items()):
            requests.add_metric(list(key), count)
        yield requests
        series = list(m.series.items())
        for attr, name, doc in HISTOGRAMS:
            family = HistogramMetricFamily(name, doc, labels=["provider"])
            for provider, s in series:
                h: LoopHistogram = getattr(s, attr)
                family.add_metric([provider], h.cumulative(), h.total)
            yield family
        out = CounterMetricFamily("sidekey_response_bytes", "Body bytes sent to clients", labels=["provider"])
        into = CounterMetricFamily("sidekey_request_bytes", "Body bytes received from clients", labels=["provider"])
        for provider, s in series:
            out.add_metric([provider], s.bytes_out)
            into.add_metric([provider], s.bytes_in)
        retries = CounterMetricFamily("sidekey_retries", "Attempts beyond the first", labels=["provider"])
        for provider, s in series:
            retries.add_metric([provider], s.retries)
        failovers = CounterMetricFamily(
            "sidekey_failovers", "Requests served by a fallback provider", labels=["provider", "fallback"]
        )
        for pair, count in list(m.failovers.items()):
            failovers.add_metric(list(pair), count)
        throttled = CounterMetricFamily(
            "sidekey_rate_limited", "429 answers: by sidekey's limits or passed on from the provider",
            labels=["provider", "source"],
        )  # fmt: skip
        for pair, count in list(m.throttled.items()):
            throttled.add_metric(list(pair), count)
        yield from (out, into, retries, failovers, throttled)
        tokens = CounterMetricFamily("sidekey_tokens", "Tokens used, by kind", labels=["provider", "model", "kind"])
        for key3, n in list(m.tokens.items()):
            tokens.add_metric(list(key3), n)
        cost = CounterMetricFamily("sidekey_cost_usd", "Cost in USD from the price table", labels=["provider", "model"])
        for pair, usd in list(m.cost.items()):
            cost.add_metric(list(pair), usd)
        estimated = CounterMetricFamily(
            "sidekey_usage_estimated", "Requests whose token counts were estimated", labels=["provider"]
        )
        for provider, count in list(m.estimated.items()):
            estimated.add_metric([provider], count)
        yield from (tokens, cost, estimated)
        gauge = GaugeMetricFamily("sidekey_policy_providers", "Providers in the active policy")
        gauge.add_metric([], m.providers_in_policy)
        yield gauge


class _EngineCollector(Collector):
    """Reads live state (pools, connections, reloads) at scrape time."""

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
        pools = stats.get("pools", {})
        sessions = GaugeMetricFamily("sidekey_upstream_pools", "Upstream connection pools, by state", labels=["state"])
        sessions.add_metric(["active"], pools.get("sessions", 0))
        sessions.add_metric(["retiring"], pools.get("retiring", 0))
        leaves = stats.get("leaf_certs", {})
        cached = GaugeMetricFamily("sidekey_leaf_certs_cached", "Leaf certificates held for CONNECT hosts (bounded)")
        cached.add_metric([], leaves.get("entries", 0))
        minted = CounterMetricFamily("sidekey_leaf_certs_minted", "Leaf certificates minted (a cache miss each)")
        minted.add_metric([], leaves.get("mints", 0))
        yield from (conns, flows, pool, reloads, sessions, cached, minted)
        yield from _upstream_families(stats.get("upstreams", []))
        yield from _credential_families(stats.get("credentials", []))
        tasks = _asyncio_tasks()
        if tasks is not None:
            gauge = GaugeMetricFamily("sidekey_asyncio_tasks", "asyncio tasks alive on the event loop (leak checks)")
            gauge.add_metric([], tasks)
            yield gauge
        lost = stats.get("records_lost", {})
        for sink, name, doc in (
            ("audit", "sidekey_audit_lines_lost", "Audit lines lost to failed writes (a full disk)"),
            ("dlq", "sidekey_dlq_entries_lost", "Dead-letter entries lost to failed writes (a full disk)"),
        ):
            if sink in lost:
                family = CounterMetricFamily(name, doc)
                family.add_metric([], lost[sink])
                yield family
        limits = stats.get("limits")
        if limits is not None:  # from the limits addon, when it runs (proxy/cli.py attaches it)
            degraded = CounterMetricFamily(
                "sidekey_limits_degraded_seconds",
                "Seconds this process counted limits alone (its share) because Redis was out of reach",
            )
            degraded.add_metric([], limits.get("degraded_seconds", 0.0))
            yield degraded
        websockets = stats.get("websockets")
        if websockets is not None:
            yield from _websocket_families(websockets)


def _websocket_families(ws: dict[str, Any]) -> Iterator[Metric]:
    """WebSocket sessions (``proxy.ws_session.Sessions``); labels are policy
    provider names and close-code classes (``ws_frames.close_label``): bounded."""
    sessions = GaugeMetricFamily("sidekey_websocket_sessions_open", "WebSocket sessions open", labels=["provider"])
    for provider, count in ws["open_by_provider"].items():
        sessions.add_metric([provider], count)
    opened = CounterMetricFamily("sidekey_websocket_sessions_opened", "WebSocket sessions opened (101 relayed)")
    opened.add_metric([], ws["opened"])
    refused = CounterMetricFamily("sidekey_websocket_sessions_refused", "Upgrades refused by concurrent_websockets")
    refused.add_metric([], ws["refused"])
    moved = CounterMetricFamily("sidekey_websocket_bytes", "WebSocket bytes relayed", labels=["direction"])
    moved.add_metric(["client_to_upstream"], ws["bytes_up"])
    moved.add_metric(["upstream_to_client"], ws["bytes_down"])
    closes = CounterMetricFamily("sidekey_websocket_closes", "Sessions ended, by the close code the client saw",
                                 labels=["provider", "code"])  # fmt: skip
    for row in ws["closes"]:
        closes.add_metric([row["provider"], row["code"]], row["count"])
    buckets = [(repr(bound), count) for bound, count in ws["duration_buckets"]] + [("+Inf", ws["duration_count"])]
    duration = HistogramMetricFamily("sidekey_websocket_session_seconds", "WebSocket session length",
                                     buckets=buckets, sum_value=ws["duration_sum"])  # fmt: skip
    yield from (sessions, opened, refused, moved, closes, duration)


def _asyncio_tasks() -> int | None:
    """Tasks on the running loop; None when scraped off the loop's thread
    (scrapes are served on the loop, so that is only a direct registry read)."""
    try:
        return len(asyncio.all_tasks())
    except RuntimeError:  # no running loop in this thread
        return None


def _credential_families(views: list[dict[str, Any]]) -> Iterator[Metric]:
    """Refreshes of dynamic credentials (secret stores, OAuth2 tokens) by
    result, and when each provider's credential stops being served: the
    earliest of its members' (a token's expiry; a store value's last good
    read + ttl + stale_for). Static keys have neither."""
    refreshes = CounterMetricFamily(
        "sidekey_credential_refresh", "Credential fetches by result (ok, error)", labels=["provider", "result"]
    )
    expiry = GaugeMetricFamily(
        "sidekey_credential_expiry_seconds",
        "Unix time when the provider's current credential stops being served (absent: it does not expire)",
        labels=["provider"],
    )
    counts: dict[tuple[str, str], int] = {}
    earliest: dict[str, float] = {}
    for v in views:
        for result, count in v.get("refreshes", {}).items():
            counts[(v["provider"], result)] = counts.get((v["provider"], result), 0) + count
        until = v.get("serve_until")
        if until is not None:
            earliest[v["provider"]] = min(until, earliest.get(v["provider"], until))
    for labels, count in counts.items():
        refreshes.add_metric(list(labels), count)
    for provider, until in earliest.items():
        expiry.add_metric([provider], until)
    yield refreshes
    yield expiry


def _upstream_families(states: list[dict[str, Any]]) -> Iterator[Metric]:
    """Per member of each upstream group; labels are the provider and member
    names from the policy. A member that goes to the CONNECT target has one
    state per host (wildcard providers): those are summed under its name."""
    labels = ["provider", "upstream"]
    families = {
        "circuit": GaugeMetricFamily("sidekey_circuit_open", "Circuits open or half-open", labels=labels),
        "unhealthy": GaugeMetricFamily("sidekey_upstream_unhealthy", "Members marked unhealthy", labels=labels),
        "in_flight": GaugeMetricFamily("sidekey_upstream_in_flight", "Requests in flight", labels=labels),
        "score": GaugeMetricFamily("sidekey_upstream_score", "Lowest availability score (0-1)", labels=labels),
    }
    merged: dict[tuple[str, str], dict[str, float]] = {}
    for s in states:
        m = merged.setdefault((s["provider"], s["name"]), {"circuit": 0, "unhealthy": 0, "in_flight": 0, "score": 1})
        m["circuit"] += s["circuit"]["state"] != "closed"
        m["unhealthy"] += not s["healthy"]
        m["in_flight"] += s["in_flight"]
        m["score"] = min(m["score"], s["score"])
    for key, values in merged.items():
        for name, family in families.items():
            family.add_metric(list(key), values[name])
    yield from families.values()
