"""Price lookup by model name (snapshots, overrides) and cost arithmetic."""

from __future__ import annotations

import math

import pytest

from addons.usage.prices import PRICES_COMPILED, SHIPPED, PriceTable
from addons.usage.tokens import Usage
from proxy.policy.rates import Price

T = PriceTable()


@pytest.mark.parametrize(
    ("model", "known"),
    [
        ("gpt-4o", "gpt-4o"),
        ("gpt-4o-2024-08-06", "gpt-4o"),
        ("gpt-4o-mini-2024-07-18", "gpt-4o-mini"),  # the longest known name, not gpt-4o
        ("GPT-4o-Mini", "gpt-4o-mini"),
        ("gpt-4.1-2025-04-14", "gpt-4.1"),
        ("gpt-4.1-nano-2025-04-14", "gpt-4.1-nano"),
        ("o3-2025-04-16", "o3"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("o4-mini-2025-04-16", "o4-mini"),
        ("gpt-5-2025-08-07", "gpt-5"),
        ("gpt-5-chat-latest", "gpt-5-chat"),
        ("gpt-5-mini-2025-08-07", "gpt-5-mini"),
        ("gpt-4-0613", "gpt-4"),
        ("claude-sonnet-4-20250514", "claude-sonnet-4"),
        ("claude-sonnet-4-0", "claude-sonnet-4"),
        ("claude-sonnet-4-5-20250929", "claude-sonnet-4-5"),
        ("claude-opus-4-20250514", "claude-opus-4"),
        ("claude-opus-4-1-20250805", "claude-opus-4-1"),
        ("claude-haiku-4-5-20251001", "claude-haiku-4-5"),
        ("claude-3-5-haiku-latest", "claude-3-5-haiku"),
        ("claude-3-haiku-20240307", "claude-3-haiku"),
        ("llama-3.3-70b-versatile", "llama-3.3-70b-versatile"),
        ("openai/gpt-oss-120b", "openai/gpt-oss-120b"),
        ("moonshotai/kimi-k2-instruct-0905", "moonshotai/kimi-k2-instruct"),
    ],
)
def test_lookup_by_exact_or_snapshot_name(model: str, known: str) -> None:
    assert T.lookup(model) is SHIPPED[known]


@pytest.mark.parametrize(
    "model",
    [
        None,
        "",
        "gpt-4o-audio-preview",  # a prefix is not enough: a different product at a different price
        "gpt-4o-realtime-preview-2024-12-17",
        "gpt-5-pro-max",
        "claude-opus-4-9",
        "claude-sonnet",
        "gpt-4o-2024",
        "my-finetune",
        "ft:gpt-4o-mini-2024-07-18:org::abc",
        "llama-3.3-70b-versatile-xl",
    ],
)
def test_unknown_models_are_unpriced(model: str | None) -> None:
    table = PriceTable()
    assert table.lookup(model) is None
    assert table.cost(Usage(1000, 1000, model=model)) is None
    assert table.statistics()["unpriced"] == 1


def test_gpt_4o_with_cached_input() -> None:
    # 10,000 prompt tokens of which 4,000 cached, 500 output: 6000*2.50 + 4000*1.25 + 500*10.00 per million
    usage = Usage(10_000, 500, cached_input=4_000, model="gpt-4o-2024-08-06")
    assert T.cost(usage) == pytest.approx((6000 * 2.50 + 4000 * 1.25 + 500 * 10.00) / 1e6)


def test_reasoning_is_billed_once_as_output() -> None:
    plain = Usage(1_000, 2_000, model="o3")
    reasoning = Usage(1_000, 2_000, reasoning=1_800, model="o3")
    assert T.cost(reasoning) == T.cost(plain) == pytest.approx((1000 * 2.00 + 2000 * 8.00) / 1e6)


def test_anthropic_cache_reads_and_writes() -> None:
    # input 7,520 = 20 fresh + 6,000 read + 1,500 written
    usage = Usage(7_520, 77, cached_input=6_000, cache_creation=1_500, model="claude-3-5-haiku-20241022")
    expected = (20 * 0.80 + 6000 * 0.08 + 1500 * 1.00 + 77 * 4.00) / 1e6
    assert T.cost(usage) == pytest.approx(expected)


def test_sonnet_4_prices_match_the_published_table() -> None:
    p = SHIPPED["claude-sonnet-4"]
    assert (p.input, p.cached_input, p.cache_write, p.output) == (3.00, 0.30, 3.75, 15.00)


def test_missing_cache_rates_bill_as_input() -> None:
    price = Price(input=1.0, output=2.0)
    usage = Usage(1_000_000, 1_000_000, cached_input=400_000, cache_creation=100_000)
    assert price.cost(usage) == pytest.approx(3.0)


def test_groq_prices() -> None:
    usage = Usage(41, 9, model="llama-3.3-70b-versatile")
    assert T.cost(usage) == pytest.approx((41 * 0.59 + 9 * 0.79) / 1e6)


def test_overrides_replace_and_add_and_follow_snapshots() -> None:
    table = PriceTable({"GPT-4o": Price(1.0, 2.0), "acme-llm": Price(0.5, 0.5, 0.1)})
    assert table.cost(Usage(1_000_000, 0, model="gpt-4o-2024-11-20")) == pytest.approx(1.0)
    assert table.cost(Usage(1_000_000, 1_000_000, cached_input=1_000_000, model="acme-llm-latest")) == pytest.approx(
        0.6
    )
    assert table.cost(Usage(1_000_000, 0, model="gpt-4o-mini")) == pytest.approx(0.15)  # untouched
    assert T.cost(Usage(1_000_000, 0, model="gpt-4o")) == pytest.approx(2.50)  # the shipped table is not changed
    assert table.statistics() == {"models": len(SHIPPED) + 1, "overrides": 2, "priced": 3, "unpriced": 0}


def test_empty_shipped_table_prices_only_overrides() -> None:
    table = PriceTable({"x": Price(1.0, 1.0)}, shipped={})
    assert table.lookup("gpt-4o") is None and table.lookup("x") is not None


@pytest.mark.parametrize("bad", [-1.0, math.inf, math.nan])
def test_price_rejects_impossible_rates(bad: float) -> None:
    with pytest.raises(ValueError):
        Price(bad, 1.0)
    with pytest.raises(ValueError):
        Price(1.0, 1.0, cached_input=bad)


def test_shipped_table_is_sane() -> None:
    for name, p in SHIPPED.items():
        assert name == name.strip().lower()
        assert p.cached_input is None or p.cached_input <= p.input, name
        assert p.cache_write is None or p.cache_write >= p.input, name
    asked = ["gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o3", "o4-mini", "gpt-5", "gpt-5-mini",
             "claude-sonnet-4", "claude-opus-4", "claude-3-5-haiku", "claude-haiku-4-5", "llama-3.3-70b-versatile",
             "llama-3.1-8b-instant"]  # fmt: skip
    assert all(m in SHIPPED for m in asked)


def test_memo_is_bounded() -> None:
    table = PriceTable()
    for i in range(5000):
        table.lookup(f"unknown-model-{i}")
    assert len(table._memo) <= 1024


def test_repr_names_the_table_date() -> None:
    assert (
        repr(PriceTable({"x": Price(1, 1)}))
        == f"PriceTable(models={len(SHIPPED) + 1}, overrides=1, compiled={PRICES_COMPILED})"
    )
