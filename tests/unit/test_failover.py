"""What a request becomes at a fallback, and how fallbacks are configured."""

from __future__ import annotations

import json

import pytest

from proxy.failover import rewrite
from proxy.policy import Fallback
from proxy.policy.load import PolicyError, parse_policy

GROQ = Fallback(
    "groq",
    paths=("/v1/chat/completions",),
    rewrite_from="/v1/",
    rewrite_to="/openai/v1/",
    models=(("gpt-4o-mini", "llama-3.1-8b-instant"), ("*", "llama-3.3-70b-versatile")),
)
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "héllo"}], "stream": True}).encode()


def test_path_model_rewritten_rest_kept() -> None:
    out = rewrite(GROQ, "/v1/chat/completions?x=1", BODY)
    assert out is not None
    assert out.path == "/openai/v1/chat/completions?x=1"
    assert out.model == "llama-3.1-8b-instant"
    assert out.body is not None
    doc = json.loads(out.body)
    assert doc == {**json.loads(BODY), "model": "llama-3.1-8b-instant"}


@pytest.mark.parametrize(
    ("fallback", "path", "body", "expected"),
    [
        (GROQ, "/v1/embeddings", BODY, None),  # outside its paths
        (GROQ, "/v1/chat/completions", b"not json", None),
        (GROQ, "/v1/chat/completions", iter([b"{}"]), None),  # a streamed body cannot be rewritten
        (Fallback("g", models=(("a", "b"),)), "/v1/x", BODY, None),  # model not in the table, no "*"
    ],
)
def test_fallback_skipped_when_it_cannot_serve(fallback: Fallback, path: str, body: object, expected: None) -> None:
    assert rewrite(fallback, path, body) is expected


def test_star_maps_any_other_model_and_no_table_keeps_the_body() -> None:
    out = rewrite(GROQ, "/v1/chat/completions", b'{"model": "gpt-4.1"}')
    assert out is not None and out.model == "llama-3.3-70b-versatile"
    plain = rewrite(Fallback("azure", rewrite_from="/v1/", rewrite_to="/openai/deployments/d/"), "/v1/x", iter(()))
    assert plain is not None and plain.body is None and plain.path == "/openai/deployments/d/x"
    no_model = rewrite(GROQ, "/v1/chat/completions", b'{"messages": []}')
    assert no_model is not None and no_model.body is None


GROUPS = """\
version: 1
alerts: {webhook: env:ALERT_URL, attempts: 5}
providers:
  openai:
    hosts: [api.openai.com]
    auth: {type: bearer, secret: env:OPENAI_API_KEY}
    upstreams:
      - {name: key-a, secret: env:KEY_A, weight: 3}
      - {name: eu, url: "https://eu.example.com/v1", priority: 1}
    balance: least_in_flight
    health_check: {path: /v1/models, expect: 200, interval: 15s, unhealthy_after: 3}
    fallbacks:
      - provider: groq
        paths: [/v1/chat/completions]
        rewrite_path: {from: /v1/, to: /openai/v1/}
        models: {gpt-4o-mini: llama-3.1-8b-instant}
  groq:
    hosts: [api.groq.com]
    auth: {type: bearer, secret: env:GROQ_API_KEY}
"""


def test_groups_fallbacks_health_and_alerts_parse() -> None:
    policy = parse_policy(GROUPS)
    openai = policy.providers[0]
    assert [(t.name, t.weight, t.priority) for t in openai.targets] == [("key-a", 3, 0), ("eu", 1, 1)]
    assert openai.secret_of(openai.targets[0]).source == "env:KEY_A"  # type: ignore[union-attr]
    assert openai.secret_of(openai.targets[1]).source == "env:OPENAI_API_KEY"  # type: ignore[union-attr]
    assert openai.targets[1].upstream is not None and openai.targets[1].upstream.path_prefix == "/v1"
    assert openai.balance == "least_in_flight"
    assert openai.health_check is not None and openai.health_check.expect == (200,)
    assert (openai.health_check.interval, openai.health_check.unhealthy_after) == (15.0, 3)
    [fb] = openai.fallbacks
    assert (fb.provider, fb.rewrite_from, fb.rewrite_to, fb.models) == (
        "groq", "/v1/", "/openai/v1/", (("gpt-4o-mini", "llama-3.1-8b-instant"),)
    )  # fmt: skip
    assert policy.alerts is not None and policy.alerts.attempts == 5
    assert policy.providers[1].targets[0].name == "default"  # one implicit member


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        (("provider: groq", "provider: nope"), "providers.openai.fallbacks[0].provider", "no provider of that name"),
        (
            ("provider: groq", "provider: openai"),
            "providers.openai.fallbacks[0].provider",
            "cannot fall back to itself",
        ),
        (("name: eu,", "name: key-a,"), "providers.openai.upstreams[1].name", "duplicate upstream name"),
        (("weight: 3", "weight: 0"), "providers.openai.upstreams[0].weight", "whole number >= 1"),
        (("balance: least_in_flight", "balance: fastest"), "providers.openai.balance", "one of: weighted"),
        (("secret: env:KEY_A", "secret: sk-live-123"), "providers.openai.upstreams[0].secret", "literal secrets"),
        (("https://eu.example.com/v1", "http://eu.example.com"), "providers.openai.upstreams[1].url", "must be https"),
        (("path: /v1/models", "path: v1/models"), "providers.openai.health_check.path", "starting with /"),
        (("webhook: env:ALERT_URL", "webhook: ftp://x"), "alerts.webhook", "http(s) URL"),
        (("to: /openai/v1/", "to: openai"), "providers.openai.fallbacks[0].rewrite_path.to", "starting with /"),
    ],
)
def test_group_problems_name_line_and_field(change: tuple[str, str], field: str, words: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(GROUPS.replace(*change))
    assert any(p.field == field and words in p.message for p in info.value.problems), info.value.problems
    assert "sk-live-123" not in str(info.value)


def test_fallback_to_a_wildcard_provider_needs_an_address() -> None:
    text = GROUPS.replace("hosts: [api.groq.com]", 'hosts: ["*.groq.com"]')
    with pytest.raises(PolicyError, match="needs an upstream URL or an exact first host"):
        parse_policy(text)
    parse_policy(text.replace('hosts: ["*.groq.com"]', 'hosts: ["*.groq.com"]\n    upstream: https://api.groq.com'))
