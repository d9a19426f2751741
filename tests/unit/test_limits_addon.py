"""The limits addon without sockets: an injected clock, real asyncio waits."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from addons.limits import Limits
from addons.usage.tokens import DEFAULT_MAX_OUTPUT, Usage, reservation
from proxy.flow import Flow, Response
from proxy.policy import Policy, Provider
from proxy.policy.rates import Rule
from proxy.testing import make_flow, make_provider


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def limited(*rules: Rule, caller_rules: tuple[Rule, ...] = (), wait: float = 0.0) -> Provider:
    return dataclasses.replace(make_provider(), limits=rules, caller_limits=caller_rules, queue_wait=wait)


def addon_for(provider: Provider, clock: Clock | None = None) -> Limits:
    addon = Limits(clock=clock or Clock())
    addon.configure(Policy(providers=(provider,)))
    return addon


async def through(addon: Limits, flow: Flow) -> Flow:
    pending = addon.request(flow)
    if pending is not None:
        await pending
    if flow.response is None:
        flow.response = Response(200)
        addon.responseheaders(flow)
    return flow


@pytest.mark.asyncio
async def test_requests_per_minute_at_the_window_edge_and_the_429() -> None:
    clock = Clock()
    provider = limited(Rule("requests", 2, 60.0))
    addon = addon_for(provider, clock)
    first = await through(addon, make_flow(provider))
    assert first.response is not None and first.response.headers["x-ratelimit-remaining-requests-minute"] == "1"
    assert first.response.headers["x-ratelimit-limit-requests-minute"] == "2"
    assert not any(name.startswith("x-ratelimit-reset") for name in first.response.headers)  # Retry-After says when
    await through(addon, make_flow(provider))
    refused = await through(addon, make_flow(provider))
    assert refused.response is not None and refused.response.status == 429
    body = json.loads(refused.response.body or b"")
    assert body["error"]["code"] == "rate_limited" and body["error"]["provider"] == "openai"
    assert refused.response.headers["retry-after"] == "30"  # 2/min: one unit back every 30 s
    clock.now += 29.999
    assert (await through(addon, make_flow(provider))).response.status == 429  # type: ignore[union-attr]
    clock.now += 0.001
    assert (await through(addon, make_flow(provider))).response.status == 200  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_caller_limits_are_per_caller() -> None:
    provider = limited(caller_rules=(Rule("requests", 1, 1.0),))
    addon = addon_for(provider)
    a1, b1, a2 = make_flow(provider), make_flow(provider), make_flow(provider)
    a1.caller, b1.caller, a2.caller = "alice", "bob", "alice"
    assert [(await through(addon, f)).response.status for f in (a1, b1, a2)] == [200, 200, 429]  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_tokens_reserved_from_the_estimate_and_reconciled() -> None:
    clock = Clock()
    provider = limited(Rule("tokens", 1000, 60.0))
    addon = addon_for(provider, clock)
    body = json.dumps({"model": "gpt-4o", "max_tokens": 300, "messages": [{"role": "user", "content": "x" * 400}]})
    flow = await through(addon, make_flow(provider, body=body.encode()))
    reserved = flow.metadata["limits"].tokens
    assert 400 <= reserved <= 450  # ~100 prompt tokens + the 300 output cap
    assert flow.response is not None
    assert int(flow.response.headers["x-ratelimit-remaining-tokens-minute"]) == 1000 - reserved
    flow.metadata["usage"] = Usage(input=100, output=20)  # what the upstream reported
    addon.response(flow)
    again = await through(addon, make_flow(provider, body=body.encode()))
    assert again.response is not None
    # the 280+ reserved-but-unused tokens came back
    assert int(again.response.headers["x-ratelimit-remaining-tokens-minute"]) == 1000 - 120 - reserved
    again.metadata["usage"] = Usage(input=100, output=20)
    addon.response(again)
    # A GET (no body: how the engine hands it over) generates no tokens: token rules neither
    # count it nor refuse it (nothing would ever give a reservation back: no usage is measured).
    listing = make_flow(provider, method="GET")
    listing.request.body, listing.request.content_length = None, 0
    await through(addon, listing)
    assert listing.response is not None and "x-ratelimit-remaining-tokens-minute" not in listing.response.headers
    third = await through(addon, make_flow(provider, body=body.encode()))
    assert int(third.response.headers["x-ratelimit-remaining-tokens-minute"]) == 1000 - 240 - reserved  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_a_get_counts_against_request_rules_only() -> None:
    provider = limited(Rule("requests", 5, 60.0), Rule("tokens", 10, 60.0))
    addon = addon_for(provider)
    for left in (4, 3):
        listing = make_flow(provider, method="GET")
        listing.request.body, listing.request.content_length = None, 0
        await through(addon, listing)
        assert listing.response is not None and listing.response.status == 200
        assert listing.response.headers["x-ratelimit-remaining-requests-minute"] == str(left)
        assert "x-ratelimit-remaining-tokens-minute" not in listing.response.headers
    post = await through(addon, make_flow(provider, body=b'{"model":"m","messages":[],"max_tokens":64}'))
    # 11+ tokens never fit in 10: no wait helps, so not a 429 (issue #16 item 5)
    assert post.response is not None and post.response.status == 413
    assert b'"request_over_limit"' in bytes(post.response.body or b"")


@pytest.mark.asyncio
async def test_concurrency_slot_returned_on_error_too() -> None:
    provider = limited(Rule("concurrent", 1))
    addon = addon_for(provider)
    held = await through(addon, make_flow(provider))
    assert (await through(addon, make_flow(provider))).response.status == 429  # type: ignore[union-attr]
    addon.error(held)
    assert (await through(addon, make_flow(provider))).response.status == 200  # type: ignore[union-attr]


@pytest.mark.asyncio
async def test_queue_serves_higher_priority_first_then_refuses_after_the_wait() -> None:
    provider = limited(Rule("requests", 1, 0.2, name="requests-fifth"), wait=2.0)  # 1 per 200 ms; wait up to 2 s
    addon = Limits()  # the real clock: the queue really waits
    addon.configure(Policy(providers=(provider,)))
    await through(addon, make_flow(provider))  # takes the only unit
    order: list[str] = []

    async def one(priority: str) -> None:
        flow = make_flow(provider, headers=[("x-sidekey-priority", priority)])
        await through(addon, flow)
        assert flow.response is not None and flow.response.status == 200
        assert "x-sidekey-priority" not in flow.request.headers  # never forwarded
        order.append(priority)

    tasks = [asyncio.create_task(one(p)) for p in ("low", "normal", "high")]
    await asyncio.gather(*tasks)
    assert order == ["high", "normal", "low"]
    assert addon.counters["queued"] == 3
    short = limited(Rule("requests", 1, 60.0), wait=0.05)
    addon.configure(Policy(providers=(short,)))
    await through(addon, make_flow(short))
    refused = await through(addon, make_flow(short))  # 60 s away: more than the wait, answered at once
    assert refused.response is not None and refused.response.status == 429


@pytest.mark.asyncio
async def test_member_limits_admit_then_report_the_wait() -> None:
    from proxy.balance import UpstreamState
    from proxy.policy import Target

    key = Target("key-a", limits=(Rule("requests", 1, 10.0, name="requests-ten"),))
    provider = dataclasses.replace(make_provider(), targets=(key,))
    addon = addon_for(provider)
    state = UpstreamState(provider, key, "h", 443)
    flow = make_flow(provider)
    assert await addon.admit_member(flow, provider, state) == 0.0
    assert await addon.admit_member(make_flow(provider), provider, state) == pytest.approx(10.0)
    addon.response(flow)  # nothing to reconcile; the rate rule stays spent
    assert "member_limits" not in flow.metadata


@pytest.mark.asyncio
async def test_a_health_probe_takes_no_member_quota() -> None:
    """A probe runs the per-attempt hooks like traffic, but a key's own limits count callers'
    requests: a key at its quota is still a reachable upstream, and nothing is held to release."""
    from proxy.attempt import Attempt, Probe
    from proxy.balance import UpstreamState
    from proxy.policy import Target

    key = Target("key-a", limits=(Rule("requests", 1, 10.0, name="requests-ten"),))
    provider = dataclasses.replace(make_provider(), targets=(key,))
    addon = addon_for(provider)
    state = UpstreamState(provider, key, "h", 443)
    probe_flow = make_flow(provider)
    for _ in range(3):
        assert (
            addon.upstream_attempt(probe_flow, Probe(state, provider, probe_flow.request.headers, "https://h/", 1))
            is None
        )
    assert not probe_flow.metadata
    flow = make_flow(provider)  # the key's one request of the window is still there for a caller
    attempt = Attempt(state, provider, flow.request.headers, "https://h/", 1)
    pending = addon.upstream_attempt(flow, attempt)
    assert pending is not None
    await pending
    assert attempt.hold_off == 0.0 and len(flow.metadata["member_limits"]) == 1


@pytest.mark.asyncio
async def test_no_limits_no_work() -> None:
    provider = make_provider()
    addon = addon_for(provider)
    flow = await through(addon, make_flow(provider))
    assert (
        flow.metadata == {}
        and flow.response is not None
        and "x-ratelimit-limit-requests-minute" not in flow.response.headers
    )


def test_reservation_reads_the_output_cap_and_nothing_for_a_bodyless_request() -> None:
    chat = b'{"model":"m","messages":[{"role":"user","content":"hi"}],"max_completion_tokens": 300}'
    assert reservation(chat, len(chat)) == len(chat) // 4 + 300
    responses = b'{"model":"m","input":"hi","max_output_tokens":7}'
    assert reservation(responses, len(responses)) == len(responses) // 4 + 7
    uncapped = b'{"model":"m","messages":[]}'
    assert reservation(uncapped, len(uncapped)) == len(uncapped) // 4 + DEFAULT_MAX_OUTPUT
    assert reservation(b"", 0) == 0  # GET /v1/models reserves no tokens
    assert reservation(None, 0) == 0  # how a bodyless request reaches the addons

    async def chunks() -> AsyncIterator[bytes]:
        yield b"{}"

    assert reservation(chunks(), 4000) == 1000 + DEFAULT_MAX_OUTPUT  # streamed: its length only
    assert reservation(chunks(), None) == DEFAULT_MAX_OUTPUT  # chunked: not even that
