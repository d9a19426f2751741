"""Policy readers for resilience: retries, circuit breakers, upstream groups, fallbacks, active health
checks and alerts. Split from ``proxy.policy.load`` (same conventions: every
problem names file, line and field; values are never echoed).
"""

from __future__ import annotations

import re
from functools import partial
from typing import TYPE_CHECKING, cast

import yaml

from proxy.policy import quotas
from proxy.policy.fields import join, line_of
from proxy.policy.model import (
    Alerts,
    Balance,
    CircuitPolicy,
    Fallback,
    HealthCheck,
    Policy,
    RetryPolicy,
    SecretRef,
    Target,
)

if TYPE_CHECKING:
    from proxy.policy.load import _Builder

TARGET = frozenset({"name", "url", "secret", "weight", "priority", "limits"})
FALLBACK = frozenset({"provider", "paths", "rewrite_path", "models"})
HEALTH = frozenset({"path", "method", "expect", "interval", "timeout", "unhealthy_after", "healthy_after"})
ALERTS = frozenset({"webhook", "timeout", "attempts"})
CIRCUIT = frozenset({"failures", "ratio", "min_requests", "window", "cooldown", "probes"})
RETRY = frozenset(
    {"attempts", "backoff_base", "backoff_cap", "deadline", "statuses", "non_idempotent", "replay_max_bytes"}
)
BALANCES: tuple[Balance, ...] = ("weighted", "least_in_flight", "latency")
_TARGET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")
_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
_METHOD = re.compile(r"[A-Z]{1,16}")
_MODEL = re.compile(r"[A-Za-z0-9*][A-Za-z0-9_.:/@+-]{0,127}")


def targets(b: _Builder, node: yaml.Node, field: str, *, need_secret: bool = False) -> tuple[Target, ...]:
    """``upstreams:``, a list of members; names unique within the provider.
    ``need_secret``: there is no ``auth.secret`` default, so each member needs its own."""
    out = b.each(node, field, partial(_target, b, need_secret=need_secret))
    if not out and not b.r.is_null(node):
        b.r.problem(node, field, "expected at least one upstream")
    seen: set[str] = set()
    for i, t in enumerate(out):
        if t.name in seen:
            b.r.problem(node, f"{field}[{i}].name", "duplicate upstream name")
        seen.add(t.name)
    return out


def _target(b: _Builder, node: yaml.Node, field: str, *, need_secret: bool) -> Target:
    r = b.r
    f = r.mapping(node, field, TARGET)
    if need_secret and "secret" not in f:
        r.problem(node, f"{field}.secret", "required: env:NAME or file:PATH (auth.secret gives no default)")
    if "name" not in f:
        raise r.problem(node, f"{field}.name", "required: a name for this upstream (shown in headers and metrics)")
    name = r.scalar(f["name"], f"{field}.name", "a name")
    if not _TARGET_NAME.fullmatch(name):
        raise r.problem(f["name"], f"{field}.name", "expected a name of A-Z, a-z, 0-9, '.', '-', '_' (at most 63)")
    return Target(
        name=name,
        upstream=b.opt(f, field, "url", r.upstream, None),
        secret=b.opt(f, field, "secret", b.credential, None),
        weight=b.opt(f, field, "weight", r.count, 1),
        priority=b.opt(f, field, "priority", r.integer, 0),
        limits=b.opt(f, field, "limits", partial(quotas.rules, b), quotas.NO_RULES, null_ok=True),
    )


def balance(b: _Builder, node: yaml.Node, field: str) -> Balance:
    return cast(Balance, b.r.choice(node, field, BALANCES))


def fallbacks(b: _Builder, node: yaml.Node, field: str) -> tuple[Fallback, ...]:
    return b.each(node, field, partial(_fallback, b))


def _fallback(b: _Builder, node: yaml.Node, field: str) -> Fallback:
    r = b.r
    f = r.mapping(node, field, FALLBACK)
    if "provider" not in f:
        raise r.problem(node, f"{field}.provider", "required: the name of another provider")
    name = r.scalar(f["provider"], f"{field}.provider", "a provider name")
    paths = b.each(f.get("paths"), f"{field}.paths", partial(_path, b))
    rewrite_from, rewrite_to = b.opt(f, field, "rewrite_path", partial(_rewrite, b), ("", ""), null_ok=True)
    no_models: tuple[tuple[str, str], ...] = ()
    models = b.opt(f, field, "models", partial(_models, b), no_models, null_ok=True)
    return Fallback(name, paths, rewrite_from, rewrite_to, models, line=line_of(f["provider"]))


def _path(b: _Builder, node: yaml.Node, field: str) -> str:
    value = b.r.scalar(node, field, "a path starting with /")
    if not _PATH.fullmatch(value):
        raise b.r.problem(node, field, "expected a path starting with /")
    return value


def _rewrite(b: _Builder, node: yaml.Node, field: str) -> tuple[str, str]:
    f = b.r.mapping(node, field, frozenset({"from", "to"}))
    if "from" not in f or "to" not in f:
        raise b.r.problem(node, field, "expected {from: /prefix/, to: /other/prefix/}")
    return _path(b, f["from"], f"{field}.from"), _path(b, f["to"], f"{field}.to")


def _models(b: _Builder, node: yaml.Node, field: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for key, label, key_node, value_node in b.r.entries(node, field):
        where = join(field, label)
        value = b.r.scalar(value_node, where, "a model name")
        if not _MODEL.fullmatch(key) or not _MODEL.fullmatch(value) or value == "*":
            b.r.problem(key_node, where, "expected model: other-model (names of A-Z, a-z, 0-9, '.', '-', ':', '/')")
            continue
        out.append((key, value))
    return tuple(out)


def health_check(b: _Builder, node: yaml.Node, field: str) -> HealthCheck:
    r, d = b.r, HealthCheck("/")
    f = r.mapping(node, field, HEALTH)
    if "path" not in f:
        raise r.problem(node, f"{field}.path", "required: the path to request, e.g. /v1/models")

    def method(n: yaml.Node, where: str) -> str:
        value = r.scalar(n, where, "an HTTP method")
        if not _METHOD.fullmatch(value):
            raise r.problem(n, where, "expected an HTTP method in capitals, e.g. GET")
        return value

    def status(n: yaml.Node, where: str) -> int:
        code = r.integer(n, where, minimum=100)
        if code > 599:
            raise r.problem(n, where, "expected an HTTP status, 100 to 599")
        return code

    expect = d.expect
    if isinstance(f.get("expect"), yaml.ScalarNode):  # expect: 200
        expect = (b.opt(f, field, "expect", status, 200),)
    elif "expect" in f:  # expect: [200, 204]
        expect = b.each(f["expect"], f"{field}.expect", status)
    return HealthCheck(
        path=b.opt(f, field, "path", partial(_path, b), "/"),
        method=b.opt(f, field, "method", method, d.method),
        expect=expect or d.expect,
        interval=b.opt(f, field, "interval", r.duration, d.interval),
        timeout=b.opt(f, field, "timeout", r.duration, d.timeout),
        unhealthy_after=b.opt(f, field, "unhealthy_after", r.count, d.unhealthy_after),
        healthy_after=b.opt(f, field, "healthy_after", r.count, d.healthy_after),
    )


def alerts(b: _Builder, node: yaml.Node, field: str) -> Alerts:
    r, d = b.r, Alerts("")
    f = r.mapping(node, field, ALERTS)
    if "webhook" not in f:
        raise r.problem(node, f"{field}.webhook", "required: an http(s) URL, env:NAME or file:PATH")
    return Alerts(
        webhook=_webhook(b, f["webhook"], f"{field}.webhook"),
        timeout=b.opt(f, field, "timeout", r.duration, d.timeout),
        attempts=b.opt(f, field, "attempts", r.count, d.attempts),
    )


def _webhook(b: _Builder, node: yaml.Node, field: str) -> str | SecretRef:
    value = b.r.string(node, field).strip()
    if value.startswith(("env:", "file:")):
        return b.r.secret(node, field)
    if not re.fullmatch(r"https?://[^\s/?#@]+(/\S*)?", value):
        raise b.r.problem(node, field, "expected an http(s) URL without user info, env:NAME or file:PATH")
    return value


def check_references(b: _Builder, policy: Policy) -> None:
    """Fallbacks must name another provider defined in the same file."""
    by_name = {p.name: p for p in policy.providers}
    for p in policy.providers:
        for i, fb in enumerate(p.fallbacks):
            where = f"providers.{p.name}.fallbacks[{i}].provider"
            other = by_name.get(fb.provider)
            if fb.provider == p.name:
                b.r.problem(fb.line, where, "a provider cannot fall back to itself")
            elif other is None:
                b.r.problem(fb.line, where, "no provider of that name in this policy")
            elif (
                other.hosts
                and other.hosts[0].startswith("*.")
                and other.upstream is None
                and not all(t.upstream for t in other.targets)
            ):
                # A fallback request has no CONNECT target of its own to go to.
                b.r.problem(fb.line, where, "that provider needs an upstream URL or an exact first host")


def retry(b: _Builder, node: yaml.Node, field: str) -> RetryPolicy:
    r, d = b.r, RetryPolicy()
    f = r.mapping(node, field, RETRY)

    def status(n: yaml.Node, where: str) -> int:
        code = r.integer(n, where, minimum=400)
        if code > 599:
            raise r.problem(n, where, "expected an HTTP error status, 400 to 599")
        return code

    return RetryPolicy(
        attempts=b.opt(f, field, "attempts", partial(r.integer, minimum=1), d.attempts),
        backoff_base=b.opt(f, field, "backoff_base", r.duration, d.backoff_base),
        backoff_cap=b.opt(f, field, "backoff_cap", r.duration, d.backoff_cap),
        deadline=b.opt(f, field, "deadline", r.duration, d.deadline),
        statuses=b.each(f.get("statuses"), f"{field}.statuses", status) if "statuses" in f else d.statuses,
        non_idempotent=b.opt(f, field, "non_idempotent", b.flag, d.non_idempotent),
        replay_max_bytes=b.opt(f, field, "replay_max_bytes", r.size, d.replay_max_bytes),
    )


def circuit(b: _Builder, node: yaml.Node, field: str) -> CircuitPolicy:
    r, d = b.r, CircuitPolicy()
    f = r.mapping(node, field, CIRCUIT)

    def share(n: yaml.Node, where: str) -> float:
        try:
            value = float(r.scalar(n, where, "a number between 0 and 1"))
        except ValueError:
            value = -1.0
        if not 0 < value <= 1:
            raise r.problem(n, where, "expected a number between 0 and 1, e.g. 0.5")
        return value

    return CircuitPolicy(
        failures=b.opt(f, field, "failures", partial(r.integer, minimum=0), d.failures),
        ratio=b.opt(f, field, "ratio", share, d.ratio),
        min_requests=b.opt(f, field, "min_requests", partial(r.integer, minimum=1), d.min_requests),
        window=b.opt(f, field, "window", r.duration, d.window),
        cooldown=b.opt(f, field, "cooldown", r.duration, d.cooldown),
        probes=b.opt(f, field, "probes", partial(r.integer, minimum=1), d.probes),
    )
