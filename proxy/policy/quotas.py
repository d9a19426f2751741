"""Policy readers for limits, budgets, prices and shared state (Redis).
Split from ``proxy.policy.load`` (same conventions: every problem names
file, line and field; values are never echoed).

    limits:          # on a provider (all keys, all callers), in caller_limits (each caller)
                     # or on one member of upstreams (that key)
      requests_per_second: 10      # also _minute, _hour, _day
      tokens_per_minute: 90000     # also tokens_per_day
      concurrent: 20
"""

from __future__ import annotations

import math
import re
from typing import Literal, cast

import yaml

from proxy.policy.fields import Invalid, Reader, join
from proxy.policy.model import Budget, RedisConfig
from proxy.policy.rates import Price, Rule

NO_RULES: tuple[Rule, ...] = ()
PERIODS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
RULES: dict[str, tuple[Literal["requests", "tokens", "concurrent"], float]] = {
    **{f"requests_per_{p}": ("requests", s) for p, s in PERIODS.items()},
    "tokens_per_minute": ("tokens", 60.0),
    "tokens_per_day": ("tokens", 86400.0),
    "concurrent": ("concurrent", 0.0),
}
# concurrent_websockets is a session count, read by proxy.policy.websocket
LIMIT_KEYS = frozenset(RULES) | {"concurrent_websockets"}
BUDGET = frozenset({"daily_usd", "monthly_usd"})
REDIS = frozenset({"url", "on_failure", "timeout"})
PRICE = frozenset({"input", "output", "cached_input", "cache_write"})
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:/@+-]{0,127}")


def rules(r: Reader, node: yaml.Node, field: str) -> tuple[Rule, ...]:
    f = r.mapping(node, field, LIMIT_KEYS)
    out = []
    for key in RULES:  # a fixed order: the order of x-ratelimit-* headers
        if key in f:
            kind, period = RULES[key]
            limit = r.opt(f, field, key, r.count, 0)
            if limit:
                out.append(Rule(kind, limit, period))
    return tuple(out)


def queue_wait(r: Reader, node: yaml.Node, field: str) -> float:
    """0 (in any spelling: 0, 0.0, 0s) answers 429 at once."""
    return r.duration(node, field, zero_ok=True)


def budget(r: Reader, node: yaml.Node, field: str) -> Budget:
    f = r.mapping(node, field, BUDGET)
    if not f:
        raise r.problem(node, field, "expected daily_usd and/or monthly_usd")
    return Budget(
        daily_usd=r.opt(f, field, "daily_usd", lambda n, w: _usd(r, n, w), None),
        monthly_usd=r.opt(f, field, "monthly_usd", lambda n, w: _usd(r, n, w), None),
    )


def _usd(r: Reader, node: yaml.Node, field: str, *, zero: bool = False) -> float:
    try:
        value = float(r.scalar(node, field, "an amount in USD").replace("_", ""))
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise r.problem(node, field, f"expected an amount in USD {'>= 0' if zero else '> 0'}, e.g. 25 or 0.5")
    return value


def redis(r: Reader, node: yaml.Node, field: str) -> RedisConfig:
    f = r.mapping(node, field, REDIS)
    if "url" not in f:
        raise r.problem(node, f"{field}.url", "required: redis://host:port/db, rediss://..., env:NAME or file:PATH")
    url_node = f["url"]
    value = r.string(url_node, f"{field}.url").strip()
    if value.startswith(("env:", "file:")):
        url: str | object = r.secret(url_node, f"{field}.url")
    elif re.fullmatch(r"rediss?://[^\s/?#]+(/\d{1,2})?", value):
        if "@" in value:  # a password in the policy file is a literal secret
            raise r.problem(url_node, f"{field}.url", "a URL with a password belongs in env:NAME or file:PATH")
        url = value
    else:
        raise r.problem(url_node, f"{field}.url", "expected redis://host:port[/db], rediss://..., env:NAME, file:PATH")
    failure = r.opt(f, field, "on_failure", lambda n, w: r.choice(n, w, ("open", "closed")), "open")
    return RedisConfig(
        url=url,  # type: ignore[arg-type]
        on_failure=cast(Literal["open", "closed"], failure),
        timeout=r.opt(f, field, "timeout", r.duration, 0.5),
    )


def callers(r: Reader, node: yaml.Node, field: str) -> str:
    f = r.mapping(node, field, frozenset({"header"}))
    if "header" not in f:
        raise r.problem(node, f"{field}.header", "required: the request header that names the caller")
    return r.credential_header(f["header"], f"{field}.header")


def prices(r: Reader, node: yaml.Node, field: str) -> tuple[tuple[str, Price], ...]:
    out: list[tuple[str, Price]] = []
    for key, label, key_node, value_node in r.entries(node, field):
        where = join(field, label)
        if not _MODEL.fullmatch(key):
            r.problem(key_node, where, "expected a model name")
            continue
        try:
            f = r.mapping(value_node, where, PRICE)
        except Invalid:
            continue
        if "input" not in f or "output" not in f:
            r.problem(value_node, where, "required: input and output (USD per million tokens)")
            continue
        rate = {k: _usd(r, n, join(where, k), zero=True) for k, n in f.items() if _ok(r, n, join(where, k))}
        if len(rate) == len(f):
            out.append((key, Price(**rate)))
    return tuple(out)


def _ok(r: Reader, node: yaml.Node, field: str) -> bool:
    try:
        _usd(r, node, field, zero=True)
    except Invalid:
        return False
    return True
