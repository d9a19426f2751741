"""Load ``policies.yaml`` into the frozen ``proxy.policy.Policy``.

Built on PyYAML's node API so every problem names the file, the line and a
dotted field path, e.g. ``policies.yaml:14: providers.openai.auth.header:
expected a header name``. All problems are collected, then raised together.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar
from urllib.parse import urlsplit

import yaml

from proxy.policy import (
    CALLER_CREDENTIAL_HEADERS,
    Auth,
    AuthType,
    IPNetwork,
    ListenerLimits,
    Policy,
    PoolLimits,
    Provider,
    SecretRef,
    Timeouts,
    UnmatchedMode,
    Upstream,
    UpstreamTLS,
    normalize_host,
)
from proxy.policy_fields import Invalid, PolicyProblem, Reader

T = TypeVar("T")

__all__ = ["PolicyError", "PolicyProblem", "load_policy", "parse_policy"]

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,62}\Z")
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_HOSTNAME = re.compile(
    r"(?=.{1,253}\Z)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*\Z"
)
_PARAM = re.compile(r"[A-Za-z0-9._~-]+\Z")

TOP = frozenset({"version", "unmatched", "limits", "network", "addons", "providers"})
LIMITS = frozenset({f for f in ListenerLimits.__dataclass_fields__})
PROVIDER = frozenset({"hosts", "upstream", "auth", "set_headers", "strip_headers", "timeouts", "tls", "pool"})
AUTH = frozenset({"type", "secret", "header", "prefix", "username", "param"})
AUTH_TYPES: tuple[AuthType, ...] = ("bearer", "header", "basic", "query", "none")


class PolicyError(Exception):
    def __init__(self, problems: list[PolicyProblem]) -> None:
        self.problems = tuple(sorted(problems, key=lambda p: p.line))
        super().__init__("\n".join(f"{p.path}:{p.line}: {p.field}: {p.message}" for p in self.problems))


def load_policy(path: str | Path) -> Policy:
    path = Path(path)
    data = path.read_bytes()
    return parse_policy(data, str(path), path.resolve().parent)


def parse_policy(text: str | bytes, source: str = "<memory>", base_dir: Path | None = None) -> Policy:
    raw = text.encode() if isinstance(text, str) else text
    reader = Reader(source)
    try:
        root = yaml.compose(raw.decode("utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        # The parser's own message can quote the offending text: name only the kind.
        raise PolicyError([PolicyProblem(source, line, "(file)", "not valid YAML")]) from None
    if root is None:
        raise PolicyError([PolicyProblem(source, 1, "(file)", "empty policy: expected a mapping with 'version: 1'")])
    policy = _Builder(reader, base_dir or Path.cwd()).policy(root)
    if reader.problems or policy is None:
        raise PolicyError(reader.problems)
    return Policy(
        providers=policy.providers,
        unmatched=policy.unmatched,
        limits=policy.limits,
        allow_networks=policy.allow_networks,
        addons=policy.addons,
        source=source,
        version=hashlib.sha256(raw).hexdigest()[:12],
    )


class _Builder:
    def __init__(self, reader: Reader, base_dir: Path) -> None:
        self.r = reader
        self.base_dir = base_dir

    def _path(self, value: str) -> str:
        path = Path(value).expanduser()
        return str(path if path.is_absolute() else (self.base_dir / path).resolve())

    def policy(self, root: yaml.Node) -> Policy | None:
        r = self.r
        try:
            top = r.mapping(root, "", TOP)
        except Invalid:
            return None
        if "version" not in top:
            r.problem(root, "version", "required (version: 1)")
        else:
            with contextlib.suppress(Invalid):
                if r.integer(top["version"], "version") != 1:
                    r.problem(top["version"], "version", "unsupported version (expected 1)")
        unmatched: UnmatchedMode = "tunnel"
        if "unmatched" in top:
            with contextlib.suppress(Invalid):
                choice = r.choice(top["unmatched"], "unmatched", ("tunnel", "deny"))
                unmatched = "deny" if choice == "deny" else "tunnel"
        limits = self.limits(top["limits"]) if "limits" in top else ListenerLimits()
        allow = self.network(top["network"]) if "network" in top else ()
        addons = self.addons(top["addons"]) if "addons" in top else ()
        providers = self.providers(top["providers"]) if "providers" in top else ()
        return Policy(providers=providers, unmatched=unmatched, limits=limits, allow_networks=allow, addons=addons)

    def limits(self, node: yaml.Node) -> ListenerLimits:
        values: dict[str, int | float] = {}
        try:
            fields = self.r.mapping(node, "limits", LIMITS)
        except Invalid:
            return ListenerLimits()
        for key, value in fields.items():
            field = f"limits.{key}"
            try:
                if key.endswith("_bytes"):
                    values[key] = self.r.size(value, field)
                elif key.endswith("_timeout"):
                    values[key] = self.r.duration(value, field)
                else:
                    values[key] = self.r.integer(value, field, minimum=1)
            except Invalid:
                pass
        return ListenerLimits(**values)  # type: ignore[arg-type]

    def network(self, node: yaml.Node) -> tuple[IPNetwork, ...]:
        out: list[IPNetwork] = []
        try:
            fields = self.r.mapping(node, "network", frozenset({"allow"}))
            items = self.r.seq(fields["allow"], "network.allow") if "allow" in fields else []
        except Invalid:
            return ()
        for i, item in enumerate(items):
            field = f"network.allow[{i}]"
            try:
                out.append(ipaddress.ip_network(self.r.scalar(item, field).strip(), strict=False))
            except Invalid:
                pass
            except ValueError:
                self.r.problem(item, field, "expected an IP address or CIDR")
        return tuple(out)

    def addons(self, node: yaml.Node) -> tuple[str, ...]:
        out: list[str] = []
        try:
            items = self.r.seq(node, "addons")
        except Invalid:
            return ()
        for i, item in enumerate(items):
            try:
                spec = self.r.string(item, f"addons[{i}]")
            except Invalid:
                continue
            out.append(self._path(spec) if spec.endswith(".py") else spec)
        return tuple(out)

    def providers(self, node: yaml.Node) -> tuple[Provider, ...]:
        try:
            entries = self.r.mapping(node, "providers", frozenset())
        except Invalid:
            return ()
        out: list[Provider] = []
        seen_hosts: dict[str, tuple[str, int]] = {}
        for name, body in entries.items():
            field = f"providers.{name}"
            key_line = next(k for k, _v in node.value if k.value == name)
            if not _NAME.match(name):
                self.r.problem(key_line, field, "provider names are lower-case letters, digits, '-' and '_'")
                continue
            try:
                provider = self.provider(name, body, key_line.start_mark.line + 1)
            except Invalid:
                continue
            for host_index, host in enumerate(provider.hosts):
                if host in seen_hosts:
                    other, line = seen_hosts[host]
                    hosts_node = self.r.mapping(body, field, PROVIDER)["hosts"]
                    self.r.problem(
                        hosts_node.value[host_index] if isinstance(hosts_node, yaml.SequenceNode) else hosts_node,
                        f"{field}.hosts[{host_index}]",
                        f"host pattern is already used by provider {other} (line {line})",
                    )
                else:
                    seen_hosts[host] = (name, provider.line)
            out.append(provider)
        return tuple(out)

    def provider(self, name: str, node: yaml.Node, line: int) -> Provider:
        r, field = self.r, f"providers.{name}"
        problems_before = len(r.problems)
        fields = r.mapping(node, field, PROVIDER)
        if "hosts" not in fields:
            raise r.problem(node, f"{field}.hosts", "required: a list of host names or *.suffix wildcards")
        if "auth" not in fields:
            raise r.problem(node, f"{field}.auth", "required (use type: none for no credential)")
        hosts = self.hosts(fields["hosts"], f"{field}.hosts")
        upstream = _try(
            lambda: self.upstream(fields["upstream"], f"{field}.upstream") if "upstream" in fields else None
        )
        auth = _try(lambda: self.auth(fields["auth"], f"{field}.auth"))
        set_headers: list[tuple[str, str]] = []
        if "set_headers" in fields:
            headers_node = fields["set_headers"]
            hfields = f"{field}.set_headers"
            entries: dict[str, yaml.Node] = _try(lambda: r.mapping(headers_node, hfields, frozenset()), {})
            for key, value in entries.items():
                hfield = f"{field}.set_headers.{key}"
                key_node = next(k for k, _v in headers_node.value if k.value == key)
                _try(lambda: set_headers.append((r.token(key_node, hfield), r.string(value, hfield))))  # noqa: B023
        strip = list(CALLER_CREDENTIAL_HEADERS)
        if "strip_headers" in fields:
            items: list[yaml.Node] = _try(lambda: r.seq(fields["strip_headers"], f"{field}.strip_headers"), [])
            for i, item in enumerate(items):
                _try(lambda: strip.append(r.token(item, f"{field}.strip_headers[{i}]")))  # noqa: B023
        if auth is not None and auth.type == "header":
            strip.append(auth.header)
        timeouts = _try(lambda: self.timeouts(fields["timeouts"], f"{field}.timeouts"), Timeouts())
        tls = _try(lambda: self.tls(fields["tls"], f"{field}.tls"), UpstreamTLS())
        pool = _try(lambda: self.pool(fields["pool"], f"{field}.pool"), PoolLimits())
        if len(r.problems) > problems_before or auth is None:
            raise Invalid()
        return Provider(
            name=name,
            hosts=hosts,
            upstream=upstream,
            auth=auth,
            set_headers=tuple(set_headers),
            strip_headers=tuple(dict.fromkeys(strip)),
            timeouts=timeouts if "timeouts" in fields else Timeouts(),
            tls=tls if "tls" in fields else UpstreamTLS(),
            pool=pool if "pool" in fields else PoolLimits(),
            line=line,
        )

    def hosts(self, node: yaml.Node, field: str) -> tuple[str, ...]:
        items = self.r.seq(node, field)
        if not items:
            raise self.r.problem(node, field, "expected at least one host")
        out: list[str] = []
        for i, item in enumerate(items):
            value = normalize_host(self.r.scalar(item, f"{field}[{i}]", "a host name"))
            name = value[2:] if value.startswith("*.") else value
            if not (_HOSTNAME.match(name) or _is_ip(name)) or ("*" in name):
                self.r.problem(
                    item, f"{field}[{i}]", "expected a host name, an IP address or *.suffix (no scheme, port or path)"
                )
                continue
            if value in out:
                self.r.problem(item, f"{field}[{i}]", "duplicate host")
                continue
            out.append(value)
        return tuple(out)

    def upstream(self, node: yaml.Node, field: str) -> Upstream:
        value = self.r.string(node, field)
        try:
            url = urlsplit(value)
            port = url.port or 443
        except ValueError:
            raise self.r.problem(node, field, "expected a URL like https://api.example.com") from None
        if url.scheme != "https":
            raise self.r.problem(node, field, "must be https: credentials are never sent over plaintext")
        if not url.hostname or url.username is not None or url.password is not None or "@" in url.netloc:
            raise self.r.problem(node, field, "expected https://host[:port][/prefix] without user info")
        if url.query or url.fragment:
            raise self.r.problem(node, field, "must not carry a query or fragment")
        return Upstream(normalize_host(url.hostname), port, url.path.rstrip("/"))

    def auth(self, node: yaml.Node, field: str) -> Auth:
        r = self.r
        fields = r.mapping(node, field, AUTH)
        if "type" not in fields:
            raise r.problem(node, f"{field}.type", f"required: one of {', '.join(AUTH_TYPES)}")
        kind: AuthType = r.choice(fields["type"], f"{field}.type", AUTH_TYPES)  # type: ignore[assignment]
        secret = None
        if kind != "none":
            if "secret" not in fields:
                raise r.problem(node, f"{field}.secret", "required: env:NAME or file:PATH")
            secret = self.secret(fields["secret"], f"{field}.secret")
        header, prefix, username, param = "authorization", "", "", ""
        if kind == "header":
            if "header" not in fields:
                raise r.problem(node, f"{field}.header", "required for type header: a header name")
            header = r.token(fields["header"], f"{field}.header")
            prefix = r.string(fields["prefix"], f"{field}.prefix") if "prefix" in fields else ""
        elif kind == "basic":
            if "username" not in fields:
                raise r.problem(node, f"{field}.username", "required for type basic")
            username = r.string(fields["username"], f"{field}.username")
            if ":" in username:
                raise r.problem(fields["username"], f"{field}.username", "must not contain ':'")
        elif kind == "query":
            if "param" not in fields:
                raise r.problem(node, f"{field}.param", "required for type query: the query parameter name")
            param = r.scalar(fields["param"], f"{field}.param", "a query parameter name")
            if not _PARAM.match(param):
                raise r.problem(fields["param"], f"{field}.param", "expected a query parameter name")
        return Auth(kind, secret, header=header, prefix=prefix, username=username, param=param)

    def secret(self, node: yaml.Node, field: str) -> SecretRef:
        value = self.r.scalar(node, field, "env:NAME or file:PATH")
        kind, _, ref = value.partition(":")
        if kind == "env" and _ENV.match(ref):
            return SecretRef("env", ref)
        if kind == "file" and ref.strip():
            return SecretRef("file", self._path(ref.strip()))
        raise self.r.problem(node, field, "expected env:NAME or file:PATH; literal secrets are not allowed")

    def timeouts(self, node: yaml.Node, field: str) -> Timeouts:
        fields = self.r.mapping(node, field, frozenset({"connect", "read"}))
        values = {k: self.r.duration(v, f"{field}.{k}") for k, v in fields.items()}
        return Timeouts(**values)

    def tls(self, node: yaml.Node, field: str) -> UpstreamTLS:
        fields = self.r.mapping(node, field, frozenset({"ca_bundle", "server_name"}))
        ca_bundle = server_name = None
        if "ca_bundle" in fields:
            ca_bundle = self._path(self.r.string(fields["ca_bundle"], f"{field}.ca_bundle"))
            if not Path(ca_bundle).is_file():
                raise self.r.problem(fields["ca_bundle"], f"{field}.ca_bundle", f"file not found: {ca_bundle}")
        if "server_name" in fields:
            server_name = normalize_host(self.r.scalar(fields["server_name"], f"{field}.server_name", "a host name"))
            if not _HOSTNAME.match(server_name):
                raise self.r.problem(fields["server_name"], f"{field}.server_name", "expected a host name")
        return UpstreamTLS(ca_bundle=ca_bundle, server_name=server_name)

    def pool(self, node: yaml.Node, field: str) -> PoolLimits:
        fields = self.r.mapping(node, field, frozenset({"max_connections", "keepalive_timeout"}))
        out = PoolLimits()
        if "max_connections" in fields:
            out = PoolLimits(
                self.r.integer(fields["max_connections"], f"{field}.max_connections", 1), out.keepalive_timeout
            )
        if "keepalive_timeout" in fields:
            keepalive = self.r.duration(fields["keepalive_timeout"], f"{field}.keepalive_timeout")
            out = PoolLimits(out.max_connections, keepalive)
        return out


def _try(read: Callable[[], T], default: T | None = None) -> T:
    """Run one field reader; on Invalid (already recorded) give the default,
    so one bad field does not hide the problems of the next."""
    try:
        return read()
    except (Invalid, KeyError):
        return default  # type: ignore[return-value]


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True
