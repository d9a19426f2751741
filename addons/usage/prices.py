"""What a :class:`~addons.usage.tokens.Usage` cost in USD. Pure: a shipped price table
plus overrides from the policy.

Prices are USD per million tokens at the standard (not batch, flex or
priority) tier. Reasoning tokens are part of the output count and billed as
output. Anthropic cache writes are billed at the 5-minute rate (1.25x input);
1-hour writes (2x) are not told apart. Long-context surcharges (some models
bill more past 200K or 272K input tokens) are not modelled.

A model is found by exact name, else by the longest known name it extends
with a snapshot suffix only (``gpt-4o-2024-08-06`` -> ``gpt-4o``,
``claude-sonnet-4-20250514`` -> ``claude-sonnet-4``, ``-latest``). A bare
prefix is not enough: ``gpt-5-pro`` or ``gpt-4o-audio-preview`` are different
products at different prices, so an unknown name is unpriced (None), never
billed as its nearest relative.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from addons.usage.tokens import Usage
from proxy.policy.rates import Price

PRICES_COMPILED = "2026-11-27"
# Sources, read on that date:
# - OpenAI: platform.openai.com/docs/pricing as recorded by pydantic/genai-prices (prices_checked up to 2025-11-13)
#   for gpt-4o..gpt-5.1 and o-series; gpt-5.2/5.4/5.5 from github/docs data/tables/copilot/models-and-pricing.yml,
#   agreeing with third-party reads of OpenAI's page (2026-06).
# - Anthropic: platform.claude.com/docs/en/about-claude/pricing (base input, 5m cache write, cache hit, output).
# - Groq: groq.com/pricing as quoted in BerriAI/litellm#19309 (2026-01) and anomalyco/models.dev#1871 (2026-05)
#   for gpt-oss and kimi-k2; the llama rates agree across several catalogues citing that page.

# A suffix that names a snapshot of the same model: a date, an MMDD revision, "-latest", Anthropic's "-0" alias.
_SNAPSHOT = re.compile(r"-20\d\d-\d\d-\d\d|-20\d{6}|-(?:0[1-9]|1[0-2])\d\d|-latest|-0")
MEMO_MAX = 1024  # distinct model names remembered; names come from clients, so the memo is bounded


def _anthropic(inp: float, output: float) -> Price:
    """Anthropic's published multipliers: cache hits 0.1x input, 5-minute cache writes 1.25x."""
    return Price(inp, output, round(inp * 0.1, 6), round(inp * 1.25, 6))


SHIPPED: Mapping[str, Price] = {
    # OpenAI
    "gpt-4o": Price(2.50, 10.00, 1.25),
    "gpt-4o-mini": Price(0.15, 0.60, 0.075),
    "chatgpt-4o-latest": Price(5.00, 15.00),
    "gpt-4.1": Price(2.00, 8.00, 0.50),
    "gpt-4.1-mini": Price(0.40, 1.60, 0.10),
    "gpt-4.1-nano": Price(0.10, 0.40, 0.025),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-4": Price(30.00, 60.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
    "o1": Price(15.00, 60.00, 7.50),
    "o1-mini": Price(1.10, 4.40, 0.55),
    "o1-pro": Price(150.00, 600.00),
    "o3": Price(2.00, 8.00, 0.50),  # after the 2025-06-10 cut from 10/40
    "o3-mini": Price(1.10, 4.40, 0.55),
    "o3-pro": Price(20.00, 80.00),
    "o4-mini": Price(1.10, 4.40, 0.275),
    "gpt-5": Price(1.25, 10.00, 0.125),
    "gpt-5-chat": Price(1.25, 10.00, 0.125),
    "gpt-5-codex": Price(1.25, 10.00, 0.125),
    "gpt-5-mini": Price(0.25, 2.00, 0.025),
    "gpt-5-nano": Price(0.05, 0.40, 0.005),
    "gpt-5-pro": Price(15.00, 120.00),
    "gpt-5.1": Price(1.25, 10.00, 0.125),
    "gpt-5.1-chat": Price(1.25, 10.00, 0.125),
    "gpt-5.1-codex": Price(1.25, 10.00, 0.125),
    "gpt-5.1-codex-mini": Price(0.25, 2.00, 0.025),
    "gpt-5.2": Price(1.75, 14.00, 0.175),
    "gpt-5.4": Price(2.50, 15.00, 0.25),  # up to 272K input tokens
    "gpt-5.4-mini": Price(0.75, 4.50, 0.075),
    "gpt-5.4-nano": Price(0.20, 1.25, 0.02),
    "gpt-5.5": Price(5.00, 30.00, 0.50),  # up to 272K input tokens
    "text-embedding-3-small": Price(0.02, 0.0),
    "text-embedding-3-large": Price(0.13, 0.0),
    "text-embedding-ada-002": Price(0.10, 0.0),
    # Anthropic
    "claude-opus-4": _anthropic(15.00, 75.00),
    "claude-opus-4-1": _anthropic(15.00, 75.00),
    "claude-opus-4-5": _anthropic(5.00, 25.00),
    "claude-opus-4-6": _anthropic(5.00, 25.00),
    "claude-opus-4-7": _anthropic(5.00, 25.00),
    "claude-opus-4-8": _anthropic(5.00, 25.00),
    "claude-sonnet-4": _anthropic(3.00, 15.00),
    "claude-sonnet-4-5": _anthropic(3.00, 15.00),
    "claude-sonnet-4-6": _anthropic(3.00, 15.00),
    "claude-3-7-sonnet": _anthropic(3.00, 15.00),
    "claude-3-5-sonnet": _anthropic(3.00, 15.00),
    "claude-haiku-4-5": _anthropic(1.00, 5.00),
    "claude-3-5-haiku": _anthropic(0.80, 4.00),
    "claude-3-haiku": Price(0.25, 1.25, 0.03, 0.30),
    "claude-3-opus": _anthropic(15.00, 75.00),
    # Groq (cache hits at half the input rate where Groq caches; no write fee)
    "llama-3.3-70b-versatile": Price(0.59, 0.79),
    "llama-3.1-8b-instant": Price(0.05, 0.08),
    "meta-llama/llama-4-scout-17b-16e-instruct": Price(0.11, 0.34),
    "openai/gpt-oss-120b": Price(0.15, 0.60, 0.075),
    "openai/gpt-oss-20b": Price(0.075, 0.30, 0.0375),
    "moonshotai/kimi-k2-instruct": Price(1.00, 3.00, 0.50),
}


class PriceTable:
    """The shipped prices with ``overrides`` (from the policy) on top; override
    names follow the same snapshot lookup as shipped ones."""

    __slots__ = ("_prices", "_by_length", "_memo", "_overrides", "_priced", "_unpriced")

    def __init__(self, overrides: Mapping[str, Price] | None = None, *, shipped: Mapping[str, Price] = SHIPPED) -> None:
        extra = {k.strip().lower(): v for k, v in (overrides or {}).items()}
        self._prices = {k.lower(): v for k, v in shipped.items()} | extra
        self._by_length = sorted(self._prices, key=len, reverse=True)
        self._memo: dict[str, Price | None] = {}
        self._overrides = len(extra)
        self._priced = self._unpriced = 0

    def lookup(self, model: str | None) -> Price | None:
        if not model:
            return None
        name = model.strip().lower()
        if name in self._prices:
            return self._prices[name]
        if name in self._memo:
            return self._memo[name]
        found = next((self._prices[k] for k in self._by_length
                      if name.startswith(k) and _SNAPSHOT.fullmatch(name, len(k))), None)  # fmt: skip
        if len(self._memo) >= MEMO_MAX:
            self._memo.clear()
        self._memo[name] = found
        return found

    def cost(self, usage: Usage) -> float | None:
        """USD, or None when the model is unknown (the caller counts it as unpriced)."""
        price = self.lookup(usage.model)
        if price is None:
            self._unpriced += 1
            return None
        self._priced += 1
        return price.cost(usage)

    def statistics(self) -> dict[str, int]:
        return {"models": len(self._prices), "overrides": self._overrides, "priced": self._priced,
                "unpriced": self._unpriced}  # fmt: skip

    def __repr__(self) -> str:
        return f"PriceTable(models={len(self._prices)}, overrides={self._overrides}, compiled={PRICES_COMPILED})"
