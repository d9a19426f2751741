"""Load ``policies.yaml`` into the frozen ``proxy.policy.Policy``.

Built on PyYAML's node API (compose, never load) so every problem names the
file, the 1-based line and a dotted field path, e.g.
``policies.yaml:14: providers.openai.auth.header: expected a header name``.
A message says what was expected and never repeats the value: a value in the
wrong place may be a secret. All problems are collected, then raised together
in file order, so one ``sidekey check`` shows everything there is to fix.

YAML anchors are allowed but aliases (``*name``) are rejected: an aliased
node lives in two places, so its problems would point at the anchor, and a
provider borrowing another's ``auth`` hides what it sends.

This module reads the structure; ``proxy.policy.yaml_nodes`` turns the text into nodes,
``proxy.policy.fields`` reads single values and the fields of a mapping (``Reader.opt``, ``each``),
and ``groups``, ``quotas``, ``websocket``, ``connection`` and ``credentials`` read their sections.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any, cast

import yaml

from proxy.policy import cache as cache_config
from proxy.policy import connection, groups, placeholders, quotas, websocket
from proxy.policy import credentials as creds
from proxy.policy.credential_model import SecretStores
from proxy.policy.fields import FRAMING, HOP_BY_HOP, Invalid, PolicyProblem, Read, Reader, join, line_of
from proxy.policy.model import (
    CALLER_CREDENTIAL_HEADERS,
    SCHEMA_VERSION,
    Auth,
    AuthType,
    Balance,
    CircuitPolicy,
    Fallback,
    IPNetwork,
    ListenerLimits,
    Policy,
    PoolLimits,
    Provider,
    RetryPolicy,
    SecretRef,
    Target,
    Timeouts,
    UnmatchedMode,
    UpstreamTLS,
)
from proxy.policy.yaml_nodes import compose

__all__ = ["PolicyError", "PolicyProblem", "load_policy", "parse_policy"]


_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}")

TOP = frozenset(
    {
        "version",
        "unmatched",
        "limits",
        "network",
        "addons",
        "alerts",
        "redis",
        "callers",
        "prices",
        "secret_stores",
        "providers",
    }
)
PROVIDER = frozenset(
    {
        "hosts",
        "upstream",
        "auth",
        "set_headers",
        "strip_headers",
        "timeouts",
        "tls",
        "pool",
        "retry",
        "circuit",
        "sse_error_event",
        "upstreams",
        "balance",
        "fallbacks",
        "health_check",
        "limits",
        "caller_limits",
        "queue_wait",
        "budget",
        "caller_budget",
        "cache",
        "placeholders",
        *websocket.FIELDS,
    }
)
AUTH_TYPES: tuple[AuthType, ...] = ("bearer", "header", "basic", "query", "oauth2", "aws-sigv4", "none")
# The fields each auth type reads; any other is a mistake (a `header:` on a
# bearer provider would otherwise be silently ignored).
AUTH_FIELDS: dict[str, frozenset[str]] = {
    "bearer": frozenset({"type", "secret"}),
    "header": frozenset({"type", "secret", "header", "prefix"}),
    "basic": frozenset({"type", "secret", "username"}),
    "query": frozenset({"type", "secret", "param"}),
    "oauth2": creds.OAUTH2,
    "aws-sigv4": creds.SIGV4,
    "none": frozenset({"type"}),
}
AUTH_ANY = frozenset().union(*AUTH_FIELDS.values())
_NO_STRINGS: tuple[str, ...] = ()
_NO_PAIRS: tuple[tuple[str, str], ...] = ()
_NO_NETWORKS: tuple[IPNetwork, ...] = ()
_NO_PROVIDERS: tuple[Provider, ...] = ()
_NO_TARGETS: tuple[Target, ...] = ()
_NO_FALLBACKS: tuple[Fallback, ...] = ()


class PolicyError(Exception):
    """Every problem found in one policy, in file order."""

    def __init__(self, problems: Iterable[PolicyProblem]) -> None:
        self.problems: tuple[PolicyProblem, ...] = tuple(sorted(problems, key=lambda p: p.line))
        super().__init__("\n".join(f"{p.path}:{p.line}: {p.field}: {p.message}" for p in self.problems))

    def __reduce__(self) -> tuple[type[PolicyError], tuple[tuple[PolicyProblem, ...]]]:
        return (PolicyError, (self.problems,))  # args hold the text; rebuild from the problems


def load_policy(path: str | Path) -> Policy:
    """Read and parse a policy file. Blocking: call it off the event loop."""
    data = Path(path).read_bytes()
    # abspath, not resolve(): see Reader.path (symlinked Kubernetes mounts).
    return parse_policy(data, str(path), Path(os.path.abspath(path)).parent)


def parse_policy(text: str | bytes, source: str = "<memory>", base_dir: Path | None = None) -> Policy:
    """Parse policy text; relative paths resolve against ``base_dir`` (default: cwd).
    ``Policy.digest`` is the first 12 hex digits of the sha256 of the bytes."""
    raw = text.encode("utf-8") if isinstance(text, str) else text
    reader = Reader(source, os.path.abspath(base_dir) if base_dir is not None else "")
    root = compose(raw, reader.problem)
    policy = None
    if root is not None:
        policy = _Builder(reader, source, hashlib.sha256(raw).hexdigest()[:12]).policy(root)
    if reader.problems or policy is None:
        raise PolicyError(reader.problems)
    return policy


class _Builder:
    """Walks the node tree; each method reads one mapping of the schema."""

    def __init__(self, reader: Reader, source: str, digest: str) -> None:
        self.r = reader
        self.source = source
        self.digest = digest
        self.hosts_seen: dict[str, tuple[str, int]] = {}  # pattern -> (provider, line)
        self.placeholders_seen: placeholders.Seen = {}

    def policy(self, root: yaml.Node) -> Policy | None:
        r = self.r
        if not isinstance(root, yaml.MappingNode):
            r.problem(root, "(file)", "expected a mapping at the top level, starting with 'version: 1'")
            return None
        top = r.mapping(root, "", TOP)
        if "version" not in top:
            r.problem(root, "version", "required (version: 1)")
        elif r.opt(top, "", "version", r.integer, SCHEMA_VERSION) != SCHEMA_VERSION:
            r.problem(top["version"], "version", f"unsupported version (expected {SCHEMA_VERSION})")
        choice = r.opt(top, "", "unmatched", lambda n, f: r.choice(n, f, ("tunnel", "deny")), "tunnel")
        unmatched: UnmatchedMode = "deny" if choice == "deny" else "tunnel"
        # Before the providers: their references are checked against the stores there are.
        stores = r.opt(top, "", "secret_stores", partial(creds.secret_stores, r), SecretStores(), null_ok=True)
        r.credential_kinds = stores.configured()
        policy = Policy(
            providers=r.opt(top, "", "providers", self.providers, _NO_PROVIDERS),
            unmatched=unmatched,
            limits=r.opt(top, "", "limits", self.limits, ListenerLimits(), null_ok=True),
            allow_networks=r.opt(top, "", "network", self.network, _NO_NETWORKS, null_ok=True),
            addons=r.each(top.get("addons"), "addons", r.addon),
            alerts=r.opt(top, "", "alerts", partial(groups.alerts, r), None, null_ok=True),
            redis=r.opt(top, "", "redis", partial(quotas.redis, r), None, null_ok=True),
            caller_header=r.opt(top, "", "callers", partial(quotas.callers, r), None, null_ok=True),
            prices=r.opt(top, "", "prices", partial(quotas.prices, r), (), null_ok=True),
            secret_stores=stores,
            source=self.source,
            digest=self.digest,
        )
        groups.check_references(r, policy)
        for p in policy.providers:
            if p.cache is not None and p.cache.backend == "redis" and policy.redis is None:
                r.problem(p.line, f"providers.{p.name}.cache.backend", "redis needs the policy's redis: section")
        return policy

    def limits(self, node: yaml.Node, field: str) -> ListenerLimits:
        r = self.r
        readers: dict[str, Read[Any]] = {"max_header_bytes": r.size, "max_headers": r.count, "max_body_bytes": r.size,
                                         "header_timeout": r.duration, "idle_timeout": r.duration,
                                         "body_timeout": r.duration}  # fmt: skip
        return r.record(node, field, ListenerLimits, readers)

    def network(self, node: yaml.Node, field: str) -> tuple[IPNetwork, ...]:
        allow = self.r.mapping(node, field, frozenset({"allow"})).get("allow")
        return self.r.each(allow, f"{field}.allow", self.r.ip_network)

    # -- providers -----------------------------------------------------------
    def providers(self, node: yaml.Node, field: str) -> tuple[Provider, ...]:
        if self.r.is_null(node):  # `providers:` with every entry commented out
            return ()
        out: list[Provider] = []
        for name, label, key_node, body in self.r.entries(node, field):
            if not _NAME.fullmatch(name):
                self.r.problem(key_node, join(field, label), "expected a name of a-z, 0-9, '-', '_' (at most 63)")
            provider = self.provider(name, label, key_node, body)
            if provider is not None:
                out.append(provider)
        return tuple(out)

    def provider(self, name: str, label: str, key_node: yaml.Node, node: yaml.Node) -> Provider | None:
        r, field = self.r, join("providers", label)
        try:
            f = r.mapping(node, field, PROVIDER)
        except Invalid:
            return None
        if "hosts" not in f:
            r.problem(key_node, f"{field}.hosts", "required: a list of host names or *.suffix wildcards")
        if "auth" not in f:
            r.problem(key_node, f"{field}.auth", "required (type: none injects nothing)")
        hosts = r.opt(f, field, "hosts", lambda n, p: self.hosts(n, p, label), _NO_STRINGS)
        auth = r.opt(f, field, "auth", self.auth, None)
        # Every field is read even when auth is bad, so all problems show at once.
        extra_strip = r.each(f.get("strip_headers"), f"{field}.strip_headers", r.strip_header)
        auth_header = (auth.header,) if auth is not None and auth.type == "header" else ()
        set_headers = r.opt(f, field, "set_headers", partial(self.set_headers, auth=auth), _NO_PAIRS, null_ok=True)
        upstream = r.opt(f, field, "upstream", r.upstream, None, null_ok=True)
        timeouts = r.opt(f, field, "timeouts", partial(connection.timeouts, r), Timeouts(), null_ok=True)
        tls = r.opt(f, field, "tls", partial(connection.tls, r), UpstreamTLS(), null_ok=True)
        pool = r.opt(f, field, "pool", partial(connection.pool, r), PoolLimits(), null_ok=True)
        retry = r.opt(f, field, "retry", partial(groups.retry, r), RetryPolicy(), null_ok=True)
        circuit = r.opt(f, field, "circuit", partial(groups.circuit, r), CircuitPolicy(), null_ok=True)
        sse_error = r.opt(f, field, "sse_error_event", r.flag, False)
        # auth.secret is the members' default: required unless every member names its own.
        if auth is not None and auth.type == "oauth2":  # the token is this provider's own credential
            auth = dataclasses.replace(auth, secret=SecretRef("oauth2", name))
        no_default = auth is not None and auth.type not in ("none", "aws-sigv4") and auth.secret is None
        read_targets = partial(groups.targets, r, need_secret=no_default)
        targets = r.opt(f, field, "upstreams", read_targets, _NO_TARGETS, null_ok=True)
        if no_default and r.is_null(f.get("upstreams")):
            r.problem(f["auth"], f"{field}.auth.secret", "required: env:NAME or file:PATH (or one on every upstream)")
        own_key = auth is not None and auth.type not in ("none", "oauth2", "aws-sigv4")  # one key per member
        if targets and auth is not None and not own_key and any(t.secret for t in targets):
            r.problem(f["upstreams"], f"{field}.upstreams", f"a member's own secret does not apply to {auth.type}")
        balance: Balance = r.opt(f, field, "balance", partial(groups.balance, r), "weighted")
        fallbacks = r.opt(f, field, "fallbacks", partial(groups.fallbacks, r), _NO_FALLBACKS, null_ok=True)
        health = r.opt(f, field, "health_check", partial(groups.health_check, r), None, null_ok=True)
        limits = r.opt(f, field, "limits", partial(quotas.rules, r), quotas.NO_RULES, null_ok=True)
        caller_limits = r.opt(f, field, "caller_limits", partial(quotas.rules, r), quotas.NO_RULES, null_ok=True)
        queue_wait = r.opt(f, field, "queue_wait", partial(quotas.queue_wait, r), 5.0)
        budget = r.opt(f, field, "budget", partial(quotas.budget, r), None, null_ok=True)
        caller_budget = r.opt(f, field, "caller_budget", partial(quotas.budget, r), None, null_ok=True)
        cache = r.opt(f, field, "cache", partial(cache_config.read, r), None, null_ok=True)
        ws = websocket.read(r, f, field, hosts)
        read_placeholders = partial(placeholders.read, r, provider=name, seen=self.placeholders_seen)
        named = r.opt(f, field, "placeholders", read_placeholders, placeholders.NONE, null_ok=True)
        if auth is None:
            return None
        return Provider(
            name=name,
            hosts=hosts,
            upstream=upstream,
            auth=auth,
            set_headers=set_headers,
            strip_headers=tuple(dict.fromkeys((*CALLER_CREDENTIAL_HEADERS, *extra_strip, *auth_header))),
            timeouts=timeouts,
            tls=tls,
            pool=pool,
            retry=retry,
            circuit=circuit,
            sse_error_event=sse_error,
            targets=targets,
            balance=balance,
            fallbacks=fallbacks,
            health_check=health,
            limits=limits,
            caller_limits=caller_limits,
            queue_wait=queue_wait,
            budget=budget,
            caller_budget=caller_budget,
            cache=cache,
            websocket=ws,
            placeholders=named,
            line=line_of(key_node),
        )

    def hosts(self, node: yaml.Node, field: str, provider: str) -> tuple[str, ...]:
        """Host patterns. Each may appear once in the whole policy: otherwise
        which provider gets a host would depend on file order."""
        out: list[str] = []
        items = self.r.seq(node, field)
        if not items:
            self.r.problem(node, field, "expected at least one host")
        for i, item in enumerate(items):
            where = f"{field}[{i}]"
            try:
                host = self.r.host(item, where, wildcard=True)
            except Invalid:
                continue
            seen = self.hosts_seen.get(host)
            if seen is None:
                self.hosts_seen[host] = (provider, line_of(item))
                out.append(host)
            elif seen[0] == provider:
                self.r.problem(item, where, f"duplicate host pattern (first at line {seen[1]})")
            else:
                self.r.problem(item, where, f"host pattern is also used by provider {seen[0]} (line {seen[1]})")
        return tuple(out)

    def auth(self, node: yaml.Node, field: str) -> Auth:
        r = self.r
        credential = partial(creds.credential, r)
        f = r.mapping(node, field, AUTH_ANY)
        if "type" not in f:
            r.problem(node, f"{field}.type", f"required: one of {', '.join(AUTH_TYPES)}")
            r.opt(f, field, "secret", credential, None)  # still catch a literal secret
            raise Invalid()
        try:
            kind = cast(AuthType, r.choice(f["type"], f"{field}.type", AUTH_TYPES))
        except Invalid:
            r.opt(f, field, "secret", credential, None)
            raise
        for key in sorted(f.keys() - AUTH_FIELDS[kind], key=lambda k: line_of(f[k])):
            r.problem(f[key], f"{field}.{key}", f"does not apply to type {kind}")
        before = len(r.problems)

        def need(key: str, read: Read[str], what: str) -> str:
            if key not in f:
                r.problem(node, f"{field}.{key}", f"required for type {kind}: {what}")
            return r.opt(f, field, key, read, "")

        # A missing secret is checked by the provider, which knows its upstreams.
        secret = r.opt(f, field, "secret", credential, None) if kind not in ("none", "oauth2", "aws-sigv4") else None
        header, prefix, username, param = "authorization", "", "", ""
        oauth2 = creds.oauth2(r, f, node, field) if kind == "oauth2" else None
        sigv4 = creds.sigv4(r, f, node, field) if kind == "aws-sigv4" else None
        if kind == "header":
            header = need("header", r.credential_header, "a header name") or header
            prefix = r.opt(f, field, "prefix", r.string, "", null_ok=True)
        elif kind == "basic":
            username = need("username", r.username, "the user name")
        elif kind == "query":
            param = need("param", r.param, "the query parameter name")
        if len(r.problems) > before:
            raise Invalid()
        return Auth(
            kind, secret, header=header, prefix=prefix, username=username, param=param, oauth2=oauth2, sigv4=sigv4
        )

    def set_headers(self, node: yaml.Node, field: str, auth: Auth | None) -> tuple[tuple[str, str], ...]:
        """Header name -> value, in file order, names lower-cased."""
        r = self.r
        credential = {*CALLER_CREDENTIAL_HEADERS, *([auth.header] if auth is not None else [])}
        out: dict[str, str] = {}
        first_line: dict[str, int] = {}
        for _key, label, key_node, value_node in r.entries(node, field):
            where = join(field, label)
            try:
                name = r.token(key_node, where)
                value = r.string(value_node, where)  # numbers arrive as their text
            except Invalid:
                continue
            if name in credential:  # else a literal secret would sit in the policy
                r.problem(key_node, where, "credentials belong in auth.secret, not set_headers")
            elif name in FRAMING or name in HOP_BY_HOP:
                r.problem(key_node, where, "is managed by the proxy and cannot be set")
            elif name in out:  # Content-Type and content-type are one header
                r.problem(key_node, where, f"duplicate header (first at line {first_line[name]})")
            else:
                out[name] = value
                first_line[name] = line_of(key_node)
        return tuple(out.items())
