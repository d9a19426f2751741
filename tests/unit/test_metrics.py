"""The metrics addon without sockets: histogram arithmetic and exposition."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from addons.metrics import LoopHistogram, Metrics
from proxy.errors import UpstreamTimeout
from proxy.flow import Response
from proxy.policy import Policy
from proxy.testing import make_flow, make_provider


def test_histogram_buckets_are_inclusive_and_cumulative() -> None:
    h = LoopHistogram((0.1, 1.0))
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.total == 8.65


def test_exposition_parses_with_bounded_labels() -> None:
    metrics = Metrics()
    provider = make_provider()
    metrics.configure(Policy(providers=(provider,)))
    ok = make_flow(provider, path="/v1/chat/completions?secret=1")
    ok.response = Response(200)
    ok.timings.update(request_sent=ok.timings["start"] + 0.0002, response_headers=ok.timings["start"] + 0.3)
    ok.timings["end"] = ok.timings["start"] + 0.5
    ok.bytes_to_client, ok.bytes_from_client = 1000, 200
    metrics.response(ok)
    failed = make_flow(provider, method="BREW")
    failed.error = UpstreamTimeout("openai")
    metrics.error(failed)
    gone = make_flow(make_provider("removed", ("x.test",)))
    metrics.response(gone)
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    requests = {tuple(sorted(s.labels.items())): s.value for s in families["sidekey_requests"].samples}
    assert requests == {
        (("method", "POST"), ("outcome", "ok"), ("provider", "openai"), ("status_class", "2xx")): 1,
        (("method", "OTHER"), ("outcome", "upstream_timeout"), ("provider", "openai"), ("status_class", "none")): 1,
        (("method", "POST"), ("outcome", "ok"), ("provider", "other"), ("status_class", "none")): 1,
    }
    duration = {
        s.name: s.value
        for s in families["sidekey_request_duration_seconds"].samples
        if s.labels.get("provider") == "openai" and s.labels.get("le") in (None, "0.5", "0.25")
    }
    assert duration["sidekey_request_duration_seconds_count"] == 1
    overhead = [s for s in families["sidekey_overhead_seconds"].samples if s.labels.get("le") == "0.00025"]
    assert overhead[0].value == 1
    out = [s.value for s in families["sidekey_response_bytes"].samples if s.labels == {"provider": "openai"}]
    assert out == [1000]
    assert "secret" not in generate_latest(metrics.registry).decode()


def _tasks_gauge(metrics: Metrics) -> list[float]:
    families = {f.name: f for f in text_string_to_metric_families(generate_latest(metrics.registry).decode())}
    return [s.value for s in families["sidekey_asyncio_tasks"].samples] if "sidekey_asyncio_tasks" in families else []


@pytest.mark.asyncio
async def test_asyncio_tasks_gauge_counts_the_loops_tasks() -> None:
    """The soak and the fault matrix read leaked tasks from this gauge."""
    metrics = Metrics()
    metrics.attach(lambda: {})
    before = _tasks_gauge(metrics)
    assert before == [len(asyncio.all_tasks())]
    release = asyncio.Event()
    parked = [asyncio.create_task(release.wait()) for _ in range(3)]
    assert _tasks_gauge(metrics) == [before[0] + 3]
    release.set()
    await asyncio.gather(*parked)
    assert _tasks_gauge(metrics) == before


def test_asyncio_tasks_gauge_absent_off_the_loop() -> None:
    metrics = Metrics()
    metrics.attach(lambda: {})
    assert _tasks_gauge(metrics) == []
