"""What a policy counts and charges: a limit ``Rule``, a model's ``Price``, and the
``Usage`` (tokens) a price is applied to.

Part of the policy model (the loader builds rules and prices, the policy holds them),
so the policy never imports the addons that act on them: the limiter arithmetic
(``addons.limits.arithmetic``) and the usage meter (``addons.usage``) import from here,
and so does the engine where it handles usage itself (a WebSocket session's meter).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

Kind = Literal["requests", "tokens", "concurrent"]
KINDS = ("requests", "tokens", "concurrent")
PERIOD_NAMES = {1.0: "second", 60.0: "minute", 3600.0: "hour", 86400.0: "day"}
TICKS = (1_000_000, 1_000, 1)  # candidate resolutions, ticks per second, finest first
MAX_CAP = 2**50  # limit * span; levels stay under 3 * MAX_CAP < 2**53, exact as Lua doubles
_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\Z")  # goes into header names: x-ratelimit-limit-<name>


@dataclass(frozen=True, slots=True)
class Rule:
    kind: Kind
    limit: int
    period: float = 0.0  # seconds; 0 for "concurrent"
    name: str = ""
    ticks: int = field(init=False, repr=False, compare=False)  # time resolution, ticks per second
    span: int = field(init=False, repr=False, compare=False)  # the period in ticks
    cap: int = field(init=False, repr=False, compare=False)  # limit * span: the level when all is used

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"rule kind must be one of {', '.join(KINDS)}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError("rule limit must be a positive integer")
        name = self.name
        if self.kind == "concurrent":
            if self.period:
                raise ValueError("a concurrent rule has no period")
            name = name or "concurrent"
            ticks = span = 0
        else:
            if not (0 < self.period < math.inf):
                raise ValueError("rule period must be a positive number of seconds")
            if not name:
                if self.period not in PERIOD_NAMES:
                    raise ValueError("a rule with an unusual period needs a name")
                name = f"{self.kind}-{PERIOD_NAMES[self.period]}"
            fits = [t for t in TICKS if self.limit * round(self.period * t) <= MAX_CAP]
            if not fits or round(self.period * fits[0]) < 1:
                raise ValueError("rule limit * period is too large (or the period too short) to count exactly")
            ticks = fits[0]
            span = round(self.period * ticks)
        if not _NAME.match(name):
            raise ValueError("rule name must be lowercase letters, digits and '-'")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "ticks", ticks)
        object.__setattr__(self, "span", span)
        object.__setattr__(self, "cap", self.limit * span)


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens. ``cached_input`` / ``cache_write`` None: billed as input."""

    input: float
    output: float
    cached_input: float | None = None
    cache_write: float | None = None

    def __post_init__(self) -> None:
        for rate in (self.input, self.output, self.cached_input, self.cache_write):
            if rate is not None and not (isinstance(rate, int | float) and math.isfinite(rate) and rate >= 0):
                raise ValueError("a price must be a finite, non-negative number")

    def cost(self, usage: Usage) -> float:
        cached, written = usage.cached_input, usage.cache_creation
        fresh = max(0, usage.input - cached - written)
        cached_rate = self.input if self.cached_input is None else self.cached_input
        write_rate = self.input if self.cache_write is None else self.cache_write
        per_million = fresh * self.input + cached * cached_rate + written * write_rate + usage.output * self.output
        return per_million / 1_000_000


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens one request used, normalised across providers (``addons.usage.tokens`` says how):
    ``cached_input`` and ``cache_creation`` are parts of ``input``, ``reasoning`` of ``output``."""

    input: int
    output: int
    cached_input: int = 0
    reasoning: int = 0
    cache_creation: int = 0
    estimated: bool = False
    model: str | None = None

    def __post_init__(self) -> None:
        # One chained test and one min(), no generator: a Usage is made for every metered answer.
        i, o, c, r, w = self.input, self.output, self.cached_input, self.reasoning, self.cache_creation
        if not (type(i) is type(o) is type(c) is type(r) is type(w) is int) or min(i, o, c, r, w) < 0:
            raise ValueError("token counts must be non-negative integers")

    @property
    def total(self) -> int:
        return self.input + self.output
