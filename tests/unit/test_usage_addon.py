"""The usage addon through its hooks: real answer bodies (the fake provider's
wire formats, JSON and SSE, both wires) fed piece by piece, the estimate
fallback, budgets at the UTC day and month edges with an injected clock."""

from __future__ import annotations

import dataclasses
import datetime
import gzip
import json
from collections.abc import Iterable
from typing import Any

import pytest
from multidict import CIMultiDict
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from addons.metrics import Metrics
from addons.usage.addon import BudgetExceeded, UsageMeter
from addons.usage.answers import json_usage
from addons.usage.tokens import RequestEstimate, Usage, usage_from_json
from proxy.balance import UpstreamState
from proxy.errors import ProxyError, UpstreamDisconnected, UpstreamTimeout
from proxy.flow import Flow, Response
from proxy.policy import Budget, Policy, Provider
from proxy.policy.rates import Price
from proxy.testing import make_flow, make_provider
from tests.fakes import anthropic_wire, openai_wire


def at(text: str) -> float:
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


NOON = at("2026-03-15T12:00:00")
OPENAI = make_provider()
ANTHROPIC = make_provider("anthropic", ("api.anthropic.com",))
CHAT = {"model": "gpt-4o-2024-08-06", "messages": [{"role": "user", "content": "say hello to me"}]}  # 4 "tokens"
MESSAGES = {"model": "claude-sonnet-4-20250514", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi there claude"}]}  # fmt: skip


def meter(*providers: Provider, clock: Clock | None = None, prices: tuple[tuple[str, Price], ...] = ()) -> UsageMeter:
    addon = UsageMeter(clock=clock or Clock(NOON))
    addon.configure(Policy(providers=providers or (OPENAI, ANTHROPIC), prices=prices))
    return addon


def flow_for(request: dict[str, Any] | None, provider: Provider = OPENAI, *, path: str = "/v1/chat/completions",
             method: str = "POST", headers: Iterable[tuple[str, str]] = ()) -> Flow:  # fmt: skip
    body = json.dumps(request).encode() if request is not None else b""
    return make_flow(provider, method=method, path=path, body=body, headers=headers)


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def run(addon: UsageMeter, flow: Flow, body: Iterable[bytes] = (), *, status: int = 200,
        content_type: str = "application/json", encoding: str | None = None,
        error: ProxyError | None = None, served_by: Provider | None = None) -> Flow:  # fmt: skip
    """The engine's order: request, responseheaders, every body piece, then response or error."""
    addon.request(flow)
    if flow.response is not None:  # answered locally
        addon.response(flow)
        return flow
    provider = served_by or flow.provider
    assert provider is not None
    flow.upstream_state = UpstreamState(provider, provider.targets[0], "upstream.test", 443)
    if status:
        headers = CIMultiDict({"content-type": content_type})
        if encoding:
            headers["content-encoding"] = encoding
        flow.response = Response(status, headers)
        addon.responseheaders(flow)
        for piece in body:
            if flow.body_observer is not None:
                flow.body_observer(piece)
    if error is not None:
        flow.error = error
        addon.error(flow)
    else:
        addon.response(flow)
    return flow


def rows(addon: UsageMeter) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    return {(r["provider"], r["model"], r["upstream"], r["caller"]): r for r in addon.usage_report()["by"]}


# -- reading usage ------------------------------------------------------------------------
def test_openai_json_usage_cost_and_ledger() -> None:
    addon = meter()
    answer = json.dumps(openai_wire.chat_completion(CHAT)).encode()
    flow = run(addon, flow_for(CHAT), [answer])
    assert flow.metadata["usage"] == Usage(4, 4, model="gpt-4o-2024-08-06")
    assert flow.metadata["cost"] == pytest.approx((4 * 2.50 + 4 * 10.00) / 1e6)
    assert flow.metadata["priced_model"] == "gpt-4o"
    assert "estimate" not in flow.metadata  # the answer reported usage: the request was never parsed
    row = rows(addon)[("openai", "gpt-4o-2024-08-06", "default", "127.0.0.1")]
    assert (row["requests"], row["input_tokens"], row["output_tokens"], row["estimated"]) == (1, 4, 4, 0)
    assert row["cost_usd"] == pytest.approx(5e-5)


def test_anthropic_json_usage() -> None:
    addon = meter()
    answer = json.dumps(anthropic_wire.message(MESSAGES)).encode()
    flow = run(addon, flow_for(MESSAGES, ANTHROPIC, path="/v1/messages"), pieces(answer, 7))
    assert flow.metadata["usage"] == Usage(3, 4, model="claude-sonnet-4-20250514")  # "Hello from fake anthropic"
    assert flow.metadata["priced_model"] == "claude-sonnet-4"
    assert flow.metadata["cost"] == pytest.approx((3 * 3.0 + 4 * 15.0) / 1e6)


@pytest.mark.parametrize("size", [1, 5, 64, 100_000])
def test_openai_stream_with_include_usage_split_anywhere(size: int) -> None:
    addon = meter()
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    stream = b"".join(openai_wire.chat_stream_events(request))
    flow = run(addon, flow_for(request), pieces(stream, size), content_type="text/event-stream; charset=utf-8")
    assert flow.metadata["usage"] == Usage(4, 4, model="gpt-4o-2024-08-06")
    assert "estimate" not in flow.metadata


def test_openai_stream_without_usage_is_estimated() -> None:
    addon = meter()
    request = {**CHAT, "stream": True}
    stream = b"".join(openai_wire.chat_stream_events(request))
    flow = run(addon, flow_for(request), pieces(stream, 50), content_type="text/event-stream")
    usage: Usage = flow.metadata["usage"]
    estimate: RequestEstimate = flow.metadata["estimate"]
    # the prompt from the request's estimate, the output from the streamed text (22 bytes -> 6 tokens)
    assert usage == Usage(estimate.prompt_tokens, 6, estimated=True, model="gpt-4o-2024-08-06")
    row = rows(addon)[("openai", "gpt-4o-2024-08-06", "default", "127.0.0.1")]
    assert row["estimated"] == 1 and row["input_tokens"] == estimate.prompt_tokens
    assert addon.statistics()["estimated"] == 1


def test_anthropic_stream() -> None:
    addon = meter()
    request = {**MESSAGES, "stream": True}
    stream = b"".join(anthropic_wire.message_stream_events(request))
    flow = run(addon, flow_for(request, ANTHROPIC, path="/v1/messages"), pieces(stream, 33),
               content_type="text/event-stream")  # fmt: skip
    assert flow.metadata["usage"] == Usage(3, 4, model="claude-sonnet-4-20250514")


def test_gzip_json_and_gzip_stream_are_inflated() -> None:
    addon = meter()
    answer = gzip.compress(json.dumps(openai_wire.chat_completion(CHAT)).encode())
    flow = run(addon, flow_for(CHAT), pieces(answer, 10), encoding="gzip")
    assert flow.metadata["usage"] == Usage(4, 4, model="gpt-4o-2024-08-06")
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    stream = gzip.compress(b"".join(openai_wire.chat_stream_events(request)))
    flow = run(addon, flow_for(request), pieces(stream, 10), content_type="text/event-stream", encoding="gzip")
    assert flow.metadata["usage"] == Usage(4, 4, model="gpt-4o-2024-08-06")


def test_an_unreadable_encoding_falls_back_to_the_estimate_and_br_is_not_offered() -> None:
    addon = meter()
    flow = flow_for(CHAT, headers=[("accept-encoding", "gzip, deflate, br, zstd")])
    run(addon, flow, [b"\x00\x01opaque"], encoding="br")
    assert flow.request.headers["accept-encoding"] == "gzip, deflate"
    assert flow.metadata["usage"] == Usage(flow.metadata["estimate"].prompt_tokens, 0, estimated=True,
                                           model="gpt-4o-2024-08-06")  # fmt: skip


def test_a_json_answer_past_4_mib_is_estimated() -> None:
    addon = meter()
    flow = run(addon, flow_for(CHAT), [b"x" * (3 << 20), b"y" * (2 << 20)])
    assert flow.metadata["usage"].estimated and flow.metadata["usage"].output == 0


def test_error_before_any_answer_counts_the_request_with_zero_tokens() -> None:
    addon = meter()
    flow = run(addon, flow_for(CHAT), status=0, error=UpstreamTimeout("openai"))
    assert flow.metadata["usage"] == Usage(0, 0, model="gpt-4o-2024-08-06") and flow.metadata["cost"] == 0.0
    row = rows(addon)[("openai", "gpt-4o-2024-08-06", "default", "127.0.0.1")]
    assert (row["requests"], row["input_tokens"], row["unpriced"]) == (1, 0, 0)


def test_a_stream_cut_midway_counts_what_arrived_as_estimated() -> None:
    addon = meter()
    request = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = openai_wire.chat_stream_events(request)[:4]  # role, "Hello", " from", " fake": no usage chunk
    flow = run(addon, flow_for(request), events, content_type="text/event-stream",
               error=UpstreamDisconnected("openai"))  # fmt: skip
    usage: Usage = flow.metadata["usage"]
    assert usage.estimated and usage.output == 4  # 15 bytes of text
    assert usage.input == flow.metadata["estimate"].prompt_tokens


def test_error_statuses_and_non_llm_requests_count_requests_only() -> None:
    addon = meter()
    flow = run(addon, flow_for(CHAT), [b'{"error":{"message":"bad"}}'], status=400)
    assert flow.metadata["usage"] == Usage(0, 0, model="gpt-4o-2024-08-06")
    models = run(
        addon, flow_for(None, method="GET", path="/v1/models"), [json.dumps(openai_wire.models_list()).encode()]
    )
    assert models.body_observer is None and models.metadata == {}  # the metrics and audit fast path stays fast
    got = rows(addon)
    assert got[("openai", "unknown", "default", "127.0.0.1")]["requests"] == 1
    assert got[("openai", "gpt-4o-2024-08-06", "default", "127.0.0.1")]["requests"] == 1


def test_unknown_models_are_unpriced_and_policy_prices_override() -> None:
    request = {**CHAT, "model": "gpt-fake"}
    answer = json.dumps(openai_wire.chat_completion(request)).encode()
    addon = meter()
    flow = run(addon, flow_for(request), [answer])
    assert flow.metadata["cost"] is None and "priced_model" not in flow.metadata
    assert rows(addon)[("openai", "gpt-fake", "default", "127.0.0.1")]["unpriced"] == 1
    addon = meter(prices=(("gpt-fake", Price(1.0, 2.0)), ("gpt-4o", Price(100.0, 100.0))))
    flow = run(addon, flow_for(request), [answer])
    assert (
        flow.metadata["cost"] == pytest.approx((4 * 1.0 + 4 * 2.0) / 1e6)
        and flow.metadata["priced_model"] == "gpt-fake"
    )
    flow = run(addon, flow_for(CHAT), [json.dumps(openai_wire.chat_completion(CHAT)).encode()])
    assert flow.metadata["cost"] == pytest.approx(8 * 100.0 / 1e6) and flow.metadata["priced_model"] == "gpt-4o"


def test_recorded_under_the_provider_that_served() -> None:
    groq = make_provider("groq", ("api.groq.com",))
    addon = meter(OPENAI, groq)
    flow = run(addon, flow_for(CHAT), [json.dumps(openai_wire.chat_completion(CHAT)).encode()], served_by=groq)
    assert list(rows(addon)) == [("groq", "gpt-4o-2024-08-06", "default", "127.0.0.1")]
    assert flow.metadata["usage"].input == 4


def test_an_estimate_from_the_limits_addon_is_reused() -> None:
    addon = meter()
    request = {**CHAT, "stream": True}
    flow = flow_for(request)
    theirs = RequestEstimate(999, 10, "gpt-4o")
    flow.metadata["estimate"] = theirs
    run(addon, flow, openai_wire.chat_stream_events(request), content_type="text/event-stream")
    assert flow.metadata["estimate"] is theirs and flow.metadata["usage"].input == 999


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"model":"gpt-4o","usage":{"prompt_tokens":7,"completion_tokens":3}}', Usage(7, 3, model="gpt-4o")),
        # the last "usage" object wins; one inside a string or as a value never matches
        (b'{"model":"m","choices":[{"message":{"content":"\\"usage\\":{\\"prompt_tokens\\":99}"}}],"kind":"usage",'
         b' "usage" : {"prompt_tokens":1,"completion_tokens":2,"prompt_tokens_details":{"cached_tokens":1}}}',
         Usage(1, 2, cached_input=1, model="m")),
        (b'{"usage":{"input_tokens":5,"output_tokens":6}}', Usage(5, 6)),
        (b'{"object":"list","data":[]}', None),
        (b'{"usage":{"prompt_tokens":1', None),  # cut
        (b'{"usage":"n/a"}', None),
    ],
)  # fmt: skip
def test_json_usage_parses_only_the_usage_object(body: bytes, expected: Usage | None) -> None:
    assert json_usage(body, "openai") == expected
    assert json_usage(body, "openai") == usage_from_json(body, "openai")  # same answer as the full parse


def test_json_usage_anthropic() -> None:
    body = json.dumps(anthropic_wire.message(MESSAGES)).encode()
    assert (
        json_usage(body, "anthropic") == usage_from_json(body, "anthropic") == Usage(3, 4, model=str(MESSAGES["model"]))
    )


# -- budgets ------------------------------------------------------------------------------
def spend(addon: UsageMeter, provider: Provider = OPENAI, caller: str = "127.0.0.1") -> Flow:
    flow = flow_for(CHAT, provider)
    flow.caller = caller
    return run(addon, flow, [json.dumps(openai_wire.chat_completion(CHAT)).encode()])  # $0.00005


def refused(flow: Flow) -> tuple[int, str, str] | None:
    resp = flow.response
    if resp is None or resp.status != 429 or resp.body is None:
        return None
    return resp.status, json.loads(resp.body)["error"]["code"], resp.headers["retry-after"]


def test_daily_budget_refuses_until_the_next_utc_day() -> None:
    clock = Clock(at("2026-03-15T23:59:00"))
    provider = dataclasses.replace(OPENAI, budget=Budget(daily_usd=0.00009))
    addon = meter(provider, clock=clock)
    assert refused(spend(addon, provider)) is None
    assert refused(spend(addon, provider)) is None  # $0.00005 < $0.00009: still allowed
    blocked = spend(addon, provider)
    assert refused(blocked) == (429, "budget_exceeded", "60")
    assert "usage" not in blocked.metadata  # a local answer is not counted
    assert rows(addon)[("openai", "gpt-4o-2024-08-06", "default", "127.0.0.1")]["requests"] == 2
    clock.now = at("2026-03-16T00:00:00")
    assert refused(spend(addon, provider)) is None
    assert addon.statistics()["refused"] == 1


def test_monthly_budget_refuses_until_the_next_month() -> None:
    clock = Clock(at("2026-12-31T23:00:00"))
    provider = dataclasses.replace(OPENAI, budget=Budget(daily_usd=1.0, monthly_usd=0.0001))
    addon = meter(provider, clock=clock)
    clock.now = at("2026-12-01T00:00:00")
    spend(addon, provider)
    clock.now = at("2026-12-31T23:00:00")
    assert refused(spend(addon, provider)) is None  # $0.00005 this month so far
    assert refused(spend(addon, provider)) == (429, "budget_exceeded", "3600")
    clock.now = at("2027-01-01T00:00:00")
    assert refused(spend(addon, provider)) is None


def test_caller_budget_is_per_caller() -> None:
    provider = dataclasses.replace(OPENAI, caller_budget=Budget(daily_usd=0.00004))
    addon = meter(provider)
    spend(addon, provider, "alice")
    flow = spend(addon, provider, "alice")
    assert refused(flow) == (429, "budget_exceeded", "43200")
    assert flow.response is not None and b"per-caller daily budget of provider openai" in (flow.response.body or b"")
    assert refused(spend(addon, provider, "bob")) is None


def test_budget_error_is_retryable_429() -> None:
    err = BudgetExceeded("openai", scope="daily", seconds=5)
    assert (err.status, err.code, err.retryable) == (429, "budget_exceeded", True)
    assert Response.from_error(err).headers["retry-after"] == "5"


# -- report, statistics ---------------------------------------------------------------------
def test_usage_report_totals_filters_and_since() -> None:
    clock = Clock(at("2026-03-14T12:00:00"))
    addon = meter(clock=clock)
    spend(addon)
    clock.now = NOON
    spend(addon, caller="bob")
    run(
        addon,
        flow_for(MESSAGES, ANTHROPIC, path="/v1/messages"),
        [json.dumps(anthropic_wire.message(MESSAGES)).encode()],
    )
    report = addon.usage_report()
    assert report["shared"] is False and report["since"] == "2026-02-01"
    assert report["totals"]["requests"] == 3 and report["totals"]["input_tokens"] == 4 + 4 + 3
    assert report["totals"]["cost_usd"] == pytest.approx(2 * 5e-5 + 69e-6)
    assert [r["provider"] for r in report["by"]] == ["anthropic", "openai", "openai"]
    assert addon.usage_report("anthropic")["totals"]["requests"] == 1
    assert addon.usage_report(since="2026-03-15")["totals"]["requests"] == 2
    assert addon.usage_report(since=str(int(NOON)))["totals"]["requests"] == 2
    with pytest.raises(ValueError):
        addon.usage_report(since="last tuesday")


def test_repr_and_statistics() -> None:
    addon = meter()
    spend(addon)
    assert repr(addon).startswith("UsageMeter(Ledger(days=1, today=2026-03-15, persist=False), PriceTable(")
    stats = addon.statistics()
    assert stats["recorded"] == 1 and stats["ledger"]["records"] == 1 and stats["redis"] is None
    assert stats["prices"]["priced"] == 1


# -- what the metrics addon makes of it ---------------------------------------------------------
def test_metrics_count_tokens_cost_and_estimates_with_bounded_model_labels() -> None:
    metrics = Metrics()
    policy = Policy(providers=(OPENAI, ANTHROPIC))
    metrics.configure(policy)
    addon = meter()
    flows = [
        run(addon, flow_for(CHAT), [json.dumps(openai_wire.chat_completion(CHAT)).encode()]),
        run(addon, flow_for({**CHAT, "model": "my-finetune-7"}), [json.dumps(openai_wire.chat_completion(CHAT)).encode()]),
        run(addon, flow_for({**MESSAGES, "stream": True}, ANTHROPIC, path="/v1/messages"),
            [b"".join(anthropic_wire.message_stream_events({**MESSAGES, "stream": True}))[:400]],
            content_type="text/event-stream"),  # cut before its usage: estimated
    ]  # fmt: skip
    for flow in flows:
        flow.timings["end"] = flow.timings["start"]
        metrics.response(flow)
    text = generate_latest(metrics.registry).decode()
    got = {(f.name, tuple(sorted(s.labels.items()))): s.value for f in text_string_to_metric_families(text)
           for s in f.samples}  # fmt: skip
    # the fake's chat answer names gpt-4o-2024-08-06 whatever was asked: both are priced, labelled by the table name
    assert got[("sidekey_tokens", (("kind", "input"), ("model", "gpt-4o"), ("provider", "openai")))] == 8
    assert got[("sidekey_tokens", (("kind", "output"), ("model", "gpt-4o"), ("provider", "openai")))] == 8
    assert ("sidekey_tokens", (("kind", "cached_input"), ("model", "gpt-4o"), ("provider", "openai"))) not in got
    assert got[("sidekey_cost_usd", (("model", "gpt-4o"), ("provider", "openai")))] == pytest.approx(2 * 5e-5)
    assert got[("sidekey_usage_estimated", (("provider", "anthropic"),))] == 1
    assert ("sidekey_usage_estimated", (("provider", "openai"),)) not in got
    labels = {v for (_name, lbls) in got for _k, v in lbls}
    assert "claude-sonnet-4-20250514" not in labels and "gpt-4o-2024-08-06" not in labels


def test_metrics_fold_unpriced_models_into_other() -> None:
    metrics = Metrics()
    metrics.configure(Policy(providers=(OPENAI,)))
    request = {**CHAT, "model": "ft:my-own-model"}
    flow = run(meter(), flow_for(request), [json.dumps(openai_wire.chat_completion(request)).encode()])
    flow.timings["end"] = flow.timings["start"]
    metrics.response(flow)
    assert metrics.tokens == {("openai", "other", "input"): 4, ("openai", "other", "output"): 4}
    assert metrics.cost == {}
