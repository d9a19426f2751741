"""Policy readers for resilience: retries, circuit breakers, upstream groups, fallbacks, active health
checks and alerts. Split from ``proxy.policy.load`` (same conventions: every
problem names file, line and field; values are never echoed).
"""

from __future__ import annotations

import re
from functools import partial
from typing import cast

import yaml

from proxy.policy import credentials as creds
from proxy.policy import quotas
from proxy.policy.fields import ABS_PATH, METHOD, Reader, join, line_of
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
_MODEL = re.compile(r"[A-Za-z0-9*][A-Za-z0-9_.:/@+-]{0,127}")


def targets(r: Reader, node: yaml.Node, field: str, *, need_secret: bool = False) -> tuple[Target, ...]:
    """``upstreams:``, a list of members; names unique within the provider.
    ``need_secret``: there is no ``auth.secret`` default, so each member needs its own."""
    out = r.each(node, field, partial(_target, r, need_secret=need_secret))
    if not out and not r.is_null(node):
        r.problem(node, field, "expected at least one upstream")
    seen: set[str] = set()
    for i, t in enumerate(out):
        if t.name in seen:
            r.problem(node, f"{field}[{i}].name", "duplicate upstream name")
        seen.add(t.name)
    return out


def _target(r: Reader, node: yaml.Node, field: str, *, need_secret: bool) -> Target:
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
        upstream=r.opt(f, field, "url", r.upstream, None),
        secret=r.opt(f, field, "secret", partial(creds.credential, r), None),
        weight=r.opt(f, field, "weight", r.count, 1),
        priority=r.opt(f, field, "priority", r.integer, 0),
        limits=r.opt(f, field, "limits", partial(quotas.rules, r), quotas.NO_RULES, null_ok=True),
    )


def balance(r: Reader, node: yaml.Node, field: str) -> Balance:
    return cast(Balance, r.choice(node, field, BALANCES))


def fallbacks(r: Reader, node: yaml.Node, field: str) -> tuple[Fallback, ...]:
    return r.each(node, field, partial(_fallback, r))


def _fallback(r: Reader, node: yaml.Node, field: str) -> Fallback:
    f = r.mapping(node, field, FALLBACK)
    if "provider" not in f:
        raise r.problem(node, f"{field}.provider", "required: the name of another provider")
    name = r.scalar(f["provider"], f"{field}.provider", "a provider name")
    paths = r.each(f.get("paths"), f"{field}.paths", partial(_path, r))
    rewrite_from, rewrite_to = r.opt(f, field, "rewrite_path", partial(_rewrite, r), ("", ""), null_ok=True)
    no_models: tuple[tuple[str, str], ...] = ()
    models = r.opt(f, field, "models", partial(_models, r), no_models, null_ok=True)
    return Fallback(name, paths, rewrite_from, rewrite_to, models, line=line_of(f["provider"]))


def _path(r: Reader, node: yaml.Node, field: str) -> str:
    return r.matching(ABS_PATH, "a path starting with /", "expected a path starting with /")(node, field)


def _rewrite(r: Reader, node: yaml.Node, field: str) -> tuple[str, str]:
    f = r.mapping(node, field, frozenset({"from", "to"}))
    if "from" not in f or "to" not in f:
        raise r.problem(node, field, "expected {from: /prefix/, to: /other/prefix/}")
    return _path(r, f["from"], f"{field}.from"), _path(r, f["to"], f"{field}.to")


def _models(r: Reader, node: yaml.Node, field: str) -> tuple[tuple[str, str], ...]:
    out: list[tuple[str, str]] = []
    for key, label, key_node, value_node in r.entries(node, field):
        where = join(field, label)
        value = r.scalar(value_node, where, "a model name")
        if not _MODEL.fullmatch(key) or not _MODEL.fullmatch(value) or value == "*":
            r.problem(key_node, where, "expected model: other-model (names of A-Z, a-z, 0-9, '.', '-', ':', '/')")
            continue
        out.append((key, value))
    return tuple(out)


def health_check(r: Reader, node: yaml.Node, field: str) -> HealthCheck:
    d = HealthCheck("/")
    f = r.mapping(node, field, HEALTH)
    if "path" not in f:
        raise r.problem(node, f"{field}.path", "required: the path to request, e.g. /v1/models")

    method = r.matching(METHOD, "an HTTP method", "expected an HTTP method in capitals, e.g. GET")
    status = r.in_range(100, 599, "expected an HTTP status, 100 to 599")

    expect = d.expect
    if isinstance(f.get("expect"), yaml.ScalarNode):  # expect: 200
        expect = (r.opt(f, field, "expect", status, 200),)
    elif "expect" in f:  # expect: [200, 204]
        expect = r.each(f["expect"], f"{field}.expect", status)
    return HealthCheck(
        path=r.opt(f, field, "path", partial(_path, r), "/"),
        method=r.opt(f, field, "method", method, d.method),
        expect=expect or d.expect,
        interval=r.opt(f, field, "interval", r.duration, d.interval),
        timeout=r.opt(f, field, "timeout", r.duration, d.timeout),
        unhealthy_after=r.opt(f, field, "unhealthy_after", r.count, d.unhealthy_after),
        healthy_after=r.opt(f, field, "healthy_after", r.count, d.healthy_after),
    )


def alerts(r: Reader, node: yaml.Node, field: str) -> Alerts:
    d = Alerts("")
    f = r.mapping(node, field, ALERTS)
    if "webhook" not in f:
        raise r.problem(node, f"{field}.webhook", "required: an http(s) URL, env:NAME or file:PATH")
    return Alerts(
        webhook=_webhook(r, f["webhook"], f"{field}.webhook"),
        timeout=r.opt(f, field, "timeout", r.duration, d.timeout),
        attempts=r.opt(f, field, "attempts", r.count, d.attempts),
    )


def _webhook(r: Reader, node: yaml.Node, field: str) -> str | SecretRef:
    value = r.string(node, field).strip()
    if value.startswith(("env:", "file:")):
        return r.secret(node, field)
    if not re.fullmatch(r"https?://[^\s/?#@]+(/\S*)?", value):
        raise r.problem(node, field, "expected an http(s) URL without user info, env:NAME or file:PATH")
    return value


def check_references(r: Reader, policy: Policy) -> None:
    """Fallbacks must name another provider defined in the same file."""
    by_name = {p.name: p for p in policy.providers}
    for p in policy.providers:
        for i, fb in enumerate(p.fallbacks):
            where = f"providers.{p.name}.fallbacks[{i}].provider"
            other = by_name.get(fb.provider)
            if fb.provider == p.name:
                r.problem(fb.line, where, "a provider cannot fall back to itself")
            elif other is None:
                r.problem(fb.line, where, "no provider of that name in this policy")
            elif (
                other.hosts
                and other.hosts[0].startswith("*.")
                and other.upstream is None
                and not all(t.upstream for t in other.targets)
            ):
                # A fallback request has no CONNECT target of its own to go to.
                r.problem(fb.line, where, "that provider needs an upstream URL or an exact first host")


def retry(r: Reader, node: yaml.Node, field: str) -> RetryPolicy:
    d = RetryPolicy()
    f = r.mapping(node, field, RETRY)

    def status(n: yaml.Node, where: str) -> int:
        code = r.integer(n, where, minimum=400)
        if code > 599:
            raise r.problem(n, where, "expected an HTTP error status, 400 to 599")
        return code

    return RetryPolicy(
        attempts=r.opt(f, field, "attempts", partial(r.integer, minimum=1), d.attempts),
        backoff_base=r.opt(f, field, "backoff_base", r.duration, d.backoff_base),
        backoff_cap=r.opt(f, field, "backoff_cap", r.duration, d.backoff_cap),
        deadline=r.opt(f, field, "deadline", r.duration, d.deadline),
        statuses=r.each(f.get("statuses"), f"{field}.statuses", status) if "statuses" in f else d.statuses,
        non_idempotent=r.opt(f, field, "non_idempotent", r.flag, d.non_idempotent),
        replay_max_bytes=r.opt(f, field, "replay_max_bytes", r.size, d.replay_max_bytes),
    )


def circuit(r: Reader, node: yaml.Node, field: str) -> CircuitPolicy:
    d = CircuitPolicy()
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
        failures=r.opt(f, field, "failures", partial(r.integer, minimum=0), d.failures),
        ratio=r.opt(f, field, "ratio", share, d.ratio),
        min_requests=r.opt(f, field, "min_requests", partial(r.integer, minimum=1), d.min_requests),
        window=r.opt(f, field, "window", r.duration, d.window),
        cooldown=r.opt(f, field, "cooldown", r.duration, d.cooldown),
        probes=r.opt(f, field, "probes", partial(r.integer, minimum=1), d.probes),
    )
