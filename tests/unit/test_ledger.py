"""The usage ledger: per-day counters, bounded keys, budget spend at day and
month edges, the Redis field encoding, and merging a day read from Redis."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from addons.usage import ledger as ledger_module
from addons.usage.ledger import (
    COUNTERS,
    OTHER,
    Ledger,
    over_budget,
    parse_since,
    previous_month_start,
)
from addons.usage.redis_ledger import decode_day, flush_args
from addons.usage.tokens import Usage
from proxy.policy import Budget


def at(text: str) -> float:
    """Unix time of an ISO UTC timestamp."""
    return datetime.datetime.fromisoformat(text).replace(tzinfo=datetime.UTC).timestamp()


NOON = at("2026-03-15T12:00:00")
KEY = ("openai", "gpt-4o", "default", "alice")
USAGE = Usage(1000, 200, cached_input=500, reasoning=50, model="gpt-4o")


def counts(
    led: Ledger, since: str = "2000-01-01", provider: str | None = None
) -> dict[tuple[str, ...], dict[str, float]]:
    return {k: dict(zip(COUNTERS, v, strict=True)) for k, v in led.query(since, provider).items()}


def test_record_and_query_sum_per_key_and_filter() -> None:
    led = Ledger()
    led.record(NOON, KEY, USAGE, 0.01)
    led.record(NOON + 60, KEY, USAGE, 0.01)
    led.record(NOON, ("anthropic", "claude-sonnet-4", "default", "bob"), Usage(10, 5, estimated=True), 0.5)
    got = counts(led)
    assert got[KEY] == {
        "requests": 2,
        "input": 2000,
        "output": 400,
        "cached_input": 1000,
        "reasoning": 100,
        "cache_creation": 0,
        "estimated": 0,
        "unpriced": 0,
        "cost_usd": pytest.approx(0.02),
        "cached": 0,
        "saved_usd": 0.0,
    }
    assert got[("anthropic", "claude-sonnet-4", "default", "bob")]["estimated"] == 1
    assert list(counts(led, provider="anthropic")) == [("anthropic", "claude-sonnet-4", "default", "bob")]
    assert counts(led, since="2026-03-16") == {}
    assert counts(led, since="2026-03-15").keys() == got.keys()


def test_unpriced_counts_only_requests_that_used_tokens() -> None:
    led = Ledger()
    led.record(NOON, ("openai", "mystery", "-", "a"), Usage(10, 10), None)
    led.record(NOON, ("openai", "mystery", "-", "a"), Usage(0, 0), None)
    c = counts(led)[("openai", "mystery", "-", "a")]
    assert (c["requests"], c["unpriced"], c["cost_usd"]) == (2, 1, 0.0)


def test_days_are_utc_buckets() -> None:
    led = Ledger()
    led.record(at("2026-03-15T23:59:59"), KEY, USAGE, 1.0)
    led.record(at("2026-03-16T00:00:00"), KEY, USAGE, 2.0)
    assert sorted(led.days) == ["2026-03-15", "2026-03-16"]
    assert counts(led, since="2026-03-16")[KEY]["cost_usd"] == 2.0


def test_spend_today_and_this_month_per_provider_and_caller() -> None:
    led = Ledger()
    led.record(at("2026-02-28T10:00:00"), KEY, USAGE, 5.0)  # last month: not this month's
    led.record(at("2026-03-01T00:00:00"), KEY, USAGE, 1.0)
    led.record(at("2026-03-14T23:00:00"), ("openai", "gpt-4o", "default", "bob"), USAGE, 2.0)
    led.record(NOON, KEY, USAGE, 0.25)
    assert led.spend(NOON, "openai") == (0.25, 3.25)
    assert led.spend(NOON, "openai", "alice") == (0.25, 1.25)
    assert led.spend(NOON, "openai", "bob") == (0.0, 2.0)
    assert led.spend(NOON, "anthropic") == (0.0, 0.0)
    led.record(NOON + 1, KEY, USAGE, 0.75)  # today's spend is read live, the month's earlier days memoised
    assert led.spend(NOON + 2, "openai") == (1.0, 4.0)
    assert led.spend(at("2026-04-01T00:00:00"), "openai") == (0.0, 0.0)  # a new month starts from zero


@pytest.mark.parametrize(
    ("budget", "day", "month", "now", "expected"),
    [
        (Budget(daily_usd=1.0), 0.99, 50.0, NOON, None),
        (Budget(daily_usd=1.0), 1.0, 1.0, NOON, ("daily", 12 * 3600)),  # reached counts
        (Budget(daily_usd=1.0), 2.0, 2.0, at("2026-03-15T23:59:59.5"), ("daily", 1)),
        (Budget(monthly_usd=10.0), 1.0, 9.99, NOON, None),
        (Budget(monthly_usd=10.0), 0.0, 10.0, at("2026-03-31T23:00:00"), ("monthly", 3600)),
        (Budget(monthly_usd=10.0), 0.0, 10.0, at("2026-12-31T00:00:00"), ("monthly", 86400)),  # December -> January
        (Budget(daily_usd=1.0, monthly_usd=10.0), 5.0, 10.0, at("2026-03-30T00:00:00"), ("monthly", 2 * 86400)),
        (Budget(), 1e9, 1e9, NOON, None),
    ],
)
def test_over_budget_resets_at_the_next_utc_day_or_month(
    budget: Budget, day: float, month: float, now: float, expected: tuple[str, int] | None
) -> None:
    assert over_budget(budget, day, month, now) == expected


def test_keys_fold_callers_then_models_into_other(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ledger_module, "SLACK", 2)
    led = Ledger(max_keys=3)
    for i in range(3):
        led.record(NOON, ("openai", "gpt-4o", "default", f"caller{i}"), USAGE, 0.0)
    led.record(NOON, ("openai", "gpt-4o", "default", "caller9"), USAGE, 0.0)  # caller folds
    led.record(NOON, ("openai", "gpt-4o", "default", "caller0"), USAGE, 0.0)  # known keys still count
    led.record(NOON, ("openai", "o3", "default", "caller8"), USAGE, 0.0)  # caller folds, the model is new: kept
    led.record(NOON, ("openai", "o1", "default", "caller7"), USAGE, 0.0)  # past max + slack: the model folds too
    led.record(NOON, ("openai", "o4", "default", "caller6"), USAGE, 0.0)  # ... into the same key
    led.record(NOON, ("groq", "llama", "default", "x"), USAGE, 0.0)  # a new provider: folded at level 2 too
    led.record(NOON, ("mistral", "large", "default", "y"), USAGE, 0.0)  # past max + 2 slack: all other
    got = counts(led)
    assert got[("openai", "gpt-4o", "default", OTHER)]["requests"] == 1
    assert got[("openai", "gpt-4o", "default", "caller0")]["requests"] == 2
    assert got[("openai", "o3", "default", OTHER)]["requests"] == 1
    assert got[("openai", OTHER, "default", OTHER)]["requests"] == 2
    assert got[("groq", OTHER, "default", OTHER)]["requests"] == 1
    assert got[(OTHER, OTHER, OTHER, OTHER)]["requests"] == 1
    assert led.statistics()["folded"] == 6 and len(led.days["2026-03-15"]) == 8


def test_long_names_are_cut() -> None:
    led = Ledger()
    led.record(NOON, ("openai", "m" * 1000, "default", "c" * 1000), USAGE, 0.0)
    (key,) = led.days["2026-03-15"]
    assert len(key[1]) == len(key[3]) == ledger_module.MAX_NAME


def test_old_days_are_dropped() -> None:
    led = Ledger(keep_days=3)
    led.record(at("2026-03-01T00:00:00"), KEY, USAGE, 1.0)
    led.record(at("2026-03-03T00:00:00"), KEY, USAGE, 1.0)
    led.record(at("2026-03-05T00:00:00"), KEY, USAGE, 1.0)
    assert sorted(led.days) == ["2026-03-03", "2026-03-05"]


def test_pending_only_when_persisted_and_taken_once() -> None:
    led = Ledger()
    led.record(NOON, KEY, USAGE, 1.0)
    assert led.take_pending() == {}
    led.persist = True
    led.record(NOON, KEY, USAGE, 1.0)
    led.record(NOON, KEY, USAGE, 1.0)
    pending = led.take_pending()
    assert pending["2026-03-15"][KEY][0] == 2 and led.take_pending() == {}
    assert counts(led)[KEY]["requests"] == 3  # the view keeps everything


def test_a_day_read_from_redis_replaces_ours_plus_what_is_not_flushed() -> None:
    led = Ledger()
    led.persist = True
    led.record(NOON, KEY, USAGE, 1.0)
    led.take_pending()  # flushed
    led.record(NOON, KEY, USAGE, 1.0)  # not yet
    other = ("openai", "gpt-4o", "default", "bob")  # another sidecar's caller
    snapshot = {KEY: [1, 1000, 200, 500, 50, 0, 0, 0, 1.0, 0, 0.0], other: [3, 0, 0, 0, 0, 0, 0, 0, 6.0, 0, 0.0]}
    led.replace_day("2026-03-15", snapshot)
    got = counts(led)
    assert got[KEY]["requests"] == 2 and got[KEY]["cost_usd"] == 2.0
    assert got[other]["requests"] == 3
    assert led.spend(NOON, "openai") == (8.0, 8.0)
    assert led.spend(NOON, "openai", "bob") == (6.0, 6.0)


NAMES = st.text(alphabet=st.sampled_from("ab|%7C25-_/.: é"), min_size=0, max_size=12)


@given(st.tuples(NAMES, NAMES, NAMES, NAMES), st.integers(1, 10**12), st.floats(1e-9, 1e6))
@settings(max_examples=200)
def test_redis_fields_round_trip_any_name(key: tuple[str, str, str, str], n: int, cost: float) -> None:
    """A '|' or '%' in a name can never forge another field."""
    keys, argv = flush_args({"2026-03-15": {key: [n, n, 0, 0, 0, 0, 0, 0, cost, n, cost]}})
    assert keys == ["sidekey:usage:2026-03-15"] and argv[0] == 5
    raw = {str(argv[i]).encode(): str(argv[i + 1]).encode() for i in range(1, len(argv), 2)}
    decoded = decode_day(raw)
    assert list(decoded) == [key]
    assert decoded[key][:3] == [n, n, 0] and decoded[key][8] == pytest.approx(cost)
    assert decoded[key][9] == n and decoded[key][10] == pytest.approx(cost)  # cached, saved_usd


def test_decode_skips_foreign_and_bad_fields() -> None:
    raw = {
        b"a|b|c|d|requests": b"2",
        b"a|b|c|requests": b"1",
        b"a|b|c|d|bogus": b"1",
        b"a|b|c|d|input": b"x",
        b"a|b|c|d|cost_usd": b"nan",
        b"a|b|c|d|output": b"-5",
    }
    assert decode_day(raw) == {("a", "b", "c", "d"): [2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]}


def test_cached_answers_are_counted_apart_and_never_as_spend() -> None:
    """A cache hit: a ``cached`` count and what it saved, no request, no tokens, no
    spend (budgets never see it); pending for Redis like any record."""
    led = Ledger()
    led.persist = True
    led.record(NOON, KEY, USAGE, 0.01)
    cached_key = ("openai", "gpt-4o", "cache", "alice")
    led.record_cached(NOON, cached_key, 0.01)
    led.record_cached(NOON + 1, cached_key, 0.01)
    got = counts(led)[cached_key]
    assert (got["requests"], got["input"], got["cost_usd"], got["cached"]) == (0, 0, 0, 2)
    assert got["saved_usd"] == pytest.approx(0.02)
    assert led.spend(NOON, "openai") == pytest.approx((0.01, 0.01))
    assert led.spend(NOON, "openai", "alice") == pytest.approx((0.01, 0.01))
    pending = led.take_pending()["2026-03-15"]
    assert pending[cached_key][9] == 2 and pending[cached_key][10] == pytest.approx(0.02)
    keys, argv = flush_args({"2026-03-15": pending})
    fields = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert fields["openai|gpt-4o|cache|alice|cached"] == 2
    assert float(fields["openai|gpt-4o|cache|alice|saved_usd"]) == pytest.approx(0.02)


def test_flush_args_leave_out_zero_counters_and_empty_days() -> None:
    keys, argv = flush_args({"2026-03-15": {KEY: [1, 0, 0, 0, 0, 0, 0, 0, 0.0, 0, 0.0]}, "2026-03-14": {}})
    assert keys == ["sidekey:usage:2026-03-15"]
    assert argv == [1, "openai|gpt-4o|default|alice|requests", 1]


@pytest.mark.parametrize(
    ("text", "day"),
    [
        ("2026-03-15", "2026-03-15"),
        ("1773576000", "2026-03-15"),
        ("1773576000.5", "2026-03-15"),
        ("2026-03-15T23:30:00Z", "2026-03-15"),
        ("2026-03-15T23:30:00-02:00", "2026-03-16"),  # 01:30 UTC the next day
        ("2026-03-15t10:00:00+00:00", "2026-03-15"),
        ("2016-12-31T23:59:60Z", "2016-12-31"),  # a leap second (RFC 3339 §5.6)
        ("0640-02-02T08:28:18Z", "0640-02-02"),  # zero-padded years
        ("0001-01-01T00:30:00+05:00", "0001-01-01"),  # before year 1 in UTC: clamped
        ("9999-12-31T23:30:00-05:00", "9999-12-31"),
    ],
)
def test_since_accepts_a_day_rfc3339_or_unix_seconds(text: str, day: str) -> None:
    assert parse_since(text) == day


@pytest.mark.parametrize("text", ["", "yesterday", "2026-13-01", "2026-03-15T10:00:00", "-5", "1e9", "2026-3-5",
                                  "9" * 40, "2026-03-15T99:00:00Z"])  # fmt: skip
def test_since_rejects_anything_else_without_quoting_it(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_since(text)
    assert text not in str(info.value) or not text


def test_previous_month_start() -> None:
    assert previous_month_start(NOON) == "2026-02-01"
    assert previous_month_start(at("2026-01-10T00:00:00")) == "2025-12-01"


def test_repr_and_statistics() -> None:
    led = Ledger()
    led.record(NOON, KEY, USAGE, 1.0)
    assert repr(led) == "Ledger(days=1, today=2026-03-15, persist=False)"
    assert led.statistics() == {"records": 1, "folded": 0, "loaded_days": 0, "days": 1, "keys": 1, "pending_keys": 0}
