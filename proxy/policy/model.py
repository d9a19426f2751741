"""The parsed policy: typed, frozen, validated once by ``proxy.policy.load``.

Nothing here does I/O. Host matching is a pure function of the policy so it
can be tested with a table and no sockets.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Literal

from proxy.policy.credential_model import OAuth2, SecretStores, SigV4
from proxy.policy.credential_model import SecretKind as SecretKind
from proxy.policy.credential_model import SecretRef as SecretRef
from proxy.policy.rates import Price, Rule

AuthType = Literal["bearer", "header", "basic", "query", "oauth2", "aws-sigv4", "none"]
# Read by proxy.secrets off the loop and looked up in a dict per request; the
# other kinds are fetched and cached by proxy.credentials.
STATIC_KINDS = frozenset({"env", "file"})
Balance = Literal["weighted", "least_in_flight", "latency"]
UnmatchedMode = Literal["tunnel", "deny"]
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

SCHEMA_VERSION = 1  # the `version:` a policy file declares; the only one understood

# Headers a caller may use to carry a credential of its own. All are removed
# from every request to a matched provider before the real one is set.
CALLER_CREDENTIAL_HEADERS: tuple[str, ...] = (
    "authorization",
    "proxy-authorization",
    "x-api-key",
    "api-key",
    "xc-token",
    "xc-auth",
    "x-goog-api-key",
)


@dataclass(frozen=True, slots=True)
class Auth:
    """How the real credential is put on the request.

    bearer: ``Authorization: Bearer <secret>``
    header: ``<header>: <prefix><secret>`` (e.g. ``x-api-key``, ``xc-token``)
    basic:  ``Authorization: Basic base64(<username>:<secret>)``
    query:  ``?<param>=<secret>`` (the caller's value for ``param`` is removed)
    oauth2: ``Authorization: Bearer <access token>`` from ``oauth2.token_url``
            (``secret`` is then ``SecretRef("oauth2", <provider>)``)
    aws-sigv4: each attempt signed with AWS SigV4 (``sigv4``; ``secret`` is None)
    none:   nothing is injected; caller credentials are still stripped
    """

    type: AuthType
    secret: SecretRef | None
    header: str = "authorization"
    prefix: str = ""
    username: str = ""
    param: str = ""
    oauth2: OAuth2 | None = None
    sigv4: SigV4 | None = None


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = 10.0  # TCP + TLS to the upstream
    read: float = 300.0  # longest gap between upstream bytes (LLMs think slowly)


@dataclass(frozen=True, slots=True)
class PoolLimits:
    max_connections: int = 100  # per upstream identity
    keepalive_timeout: float = 60.0  # idle upstream connections are closed after this


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When a failed attempt is tried again (decided by ``proxy.retry``)."""

    attempts: int = 3  # in total, the first included; 1 disables retries
    backoff_base: float = 0.25  # full jitter: uniform(0, min(cap, base * 2**n))
    backoff_cap: float = 8.0
    deadline: float = 30.0  # no retry starts later than this after the request arrived
    statuses: tuple[int, ...] = (429, 500, 502, 503, 504)
    non_idempotent: bool = False  # retry POST/PATCH even when the upstream may have processed it
    replay_max_bytes: int = 1024 * 1024  # larger bodies are streamed once and never retried


@dataclass(frozen=True, slots=True)
class CircuitPolicy:
    failures: int = 5  # consecutive failures that open it; 0 disables the breaker
    ratio: float = 0.5  # or this share of failures within the window ...
    min_requests: int = 20  # ... once at least this many requests were seen
    window: float = 30.0
    cooldown: float = 30.0
    probes: int = 1


@dataclass(frozen=True, slots=True)
class UpstreamTLS:
    ca_bundle: str | None = None  # extra CA file, added to the system store
    server_name: str | None = None  # SNI / certificate name, when not the URL host


@dataclass(frozen=True, slots=True)
class Upstream:
    """A parsed upstream base URL (scheme is always https)."""

    host: str
    port: int
    path_prefix: str = ""  # no trailing slash; "" for none


@dataclass(frozen=True, slots=True)
class Target:
    """One member of a provider's upstream group: a key of a key pool, a
    region or a deployment. Each keeps its own circuit, health and limits."""

    name: str  # shown in x-sidekey-upstream, metrics and the admin API
    upstream: Upstream | None = None  # None: the provider's upstream (or the CONNECT target)
    secret: SecretRef | None = None  # None: the provider's auth.secret
    weight: int = 1  # share of traffic among healthy members of one priority
    priority: int = 0  # lower first; higher priorities only when all lower are unavailable
    limits: tuple[Rule, ...] = ()  # this key's own quota (requests, tokens, concurrency)


@dataclass(frozen=True, slots=True)
class Budget:
    """A spend cap in USD, counted from the shipped prices (or the policy's)."""

    daily_usd: float | None = None  # per UTC day
    monthly_usd: float | None = None  # per UTC calendar month


@dataclass(frozen=True, slots=True)
class RedisConfig:
    """Shared limit and usage state across sidekey instances."""

    url: str | SecretRef  # redis://[:password@]host:port/db, or where it is kept (it may hold a password)
    on_failure: Literal["open", "closed"] = "open"  # open: local limits while Redis is down; closed: 503
    timeout: float = 0.5  # per Redis call


@dataclass(frozen=True, slots=True)
class Fallback:
    """Another provider that serves this one's requests when every upstream of
    this one failed or is open. Only what must change is rewritten."""

    provider: str
    paths: tuple[str, ...] = ()  # path prefixes that may fail over; () = every path
    rewrite_from: str = ""  # path prefix replaced ...
    rewrite_to: str = ""  # ... by this (e.g. /v1/ -> /openai/v1/)
    models: tuple[tuple[str, str], ...] = ()  # JSON "model" mapping; "*" matches any other model
    line: int = 0


@dataclass(frozen=True, slots=True)
class HealthCheck:
    """Active health check, run per upstream with its credential injected."""

    path: str
    method: str = "GET"
    expect: tuple[int, ...] = (200,)
    interval: float = 30.0  # plus up to 10% jitter
    timeout: float = 5.0
    unhealthy_after: int = 2  # consecutive failed checks
    healthy_after: int = 1  # consecutive passed checks


@dataclass(frozen=True, slots=True)
class Alerts:
    """Where upstream health and circuit changes are POSTed as JSON."""

    webhook: str | SecretRef  # a URL, or where one is kept (Slack-style URLs are secrets)
    timeout: float = 5.0
    attempts: int = 3


@dataclass(frozen=True, slots=True)
class WebSocketPolicy:
    """WebSocket sessions to a provider (``proxy.ws_session``); read by
    ``proxy.policy.websocket`` from ``websocket*`` fields and ``limits.concurrent_websockets``."""

    allowed: bool = False  # default: true when a host of the provider is known to offer WebSocket
    idle_timeout: float = 300.0  # no frame either way for this long: closed with 1001
    max_duration: float = 3600.0  # a session longer than this: closed with 1001
    usage: Literal["none", "openai-realtime"] = "none"  # read response.done usage from the frames
    max_sessions: int = 0  # concurrent sessions per provider in this process; 0: no limit
    caller_max_sessions: int = 0  # the same, per caller


CacheBackend = Literal["memory", "redis"]
CacheScope = Literal["upstream", "caller"]

# Request headers that change an AI provider's answer. ``accept-encoding`` is
# here because an entry is stored as the upstream encoded it.
CACHE_VARY = (
    "accept",
    "accept-encoding",
    "content-type",
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "openai-project",
    "openai-beta",
)
CACHE_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/responses")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    """A provider's response cache (``cache:``, read by ``proxy.policy.cache``; used by ``addons/cache``)."""

    ttl: float = 300.0
    methods: tuple[str, ...] = ("GET", "HEAD")  # cached on every path
    paths: tuple[str, ...] = CACHE_PATHS  # where POST is cached too
    max_entry_bytes: int = 1024 * 1024
    max_bytes: int = 64 * 1024 * 1024
    backend: CacheBackend = "memory"
    stale_if_error: float = 0.0
    coalesce: bool = True
    coalesce_cluster: bool = False  # coalesce: cluster (Redis backend): across sidecars too
    count_hits: Literal["none", "caller"] = "none"  # caller: hits take from the caller's request rules
    scope: CacheScope = "upstream"
    vary: tuple[str, ...] = CACHE_VARY  # lower-case
    statuses: tuple[int, ...] = (200,)

    def method_cached(self, method: str, path: str) -> bool:
        """Whether a request may be answered from (and stored in) the cache."""
        if method in self.methods:
            return True
        return method == "POST" and path.split("?", 1)[0] in self.paths


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    hosts: tuple[str, ...]  # lower-case; "*.suffix" wildcards allowed
    upstream: Upstream | None  # None: https://<CONNECT host>:<CONNECT port>
    auth: Auth
    set_headers: tuple[tuple[str, str], ...] = ()  # set when the caller did not
    strip_headers: tuple[str, ...] = CALLER_CREDENTIAL_HEADERS  # lower-case
    timeouts: Timeouts = field(default_factory=Timeouts)
    tls: UpstreamTLS = field(default_factory=UpstreamTLS)
    pool: PoolLimits = field(default_factory=PoolLimits)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    circuit: CircuitPolicy = field(default_factory=CircuitPolicy)
    # When an SSE stream dies mid-answer, send a final `event: error` before
    # cutting the connection (the cut alone already tells HTTP clients).
    sse_error_event: bool = False
    # The upstream group; empty means one member named "default" using
    # ``upstream`` and ``auth.secret``.
    targets: tuple[Target, ...] = ()
    balance: Balance = "weighted"
    fallbacks: tuple[Fallback, ...] = ()
    health_check: HealthCheck | None = None
    limits: tuple[Rule, ...] = ()  # the whole provider: every key, every caller
    caller_limits: tuple[Rule, ...] = ()  # each caller on its own
    queue_wait: float = 5.0  # a request over a limit waits this long for room, then 429
    budget: Budget | None = None  # the whole provider
    caller_budget: Budget | None = None  # each caller
    cache: CachePolicy | None = None  # None: no response cache (addons/cache)
    websocket: WebSocketPolicy = field(default_factory=WebSocketPolicy)
    # ``placeholders:`` name -> where its value lives (``proxy.placeholders``);
    # substituted on requests to this provider's hosts only.
    placeholders: tuple[tuple[str, SecretRef], ...] = ()
    line: int = 0  # where it is defined, for messages

    def __post_init__(self) -> None:
        if not self.targets:  # its URL is the provider's (None: follow ``upstream``, whatever it is)
            object.__setattr__(self, "targets", (Target("default"),))

    def secret_of(self, target: Target) -> SecretRef | None:
        return target.secret or self.auth.secret


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    max_header_bytes: int = 65536  # request line + headers; over it: 431
    max_headers: int = 100  # over it: 431
    max_body_bytes: int = 2 * 1024**3  # over it: 413
    header_timeout: float = 10.0  # to read a request head on a fresh connection
    idle_timeout: float = 60.0  # keep-alive connection with no request
    body_timeout: float = 60.0  # longest gap between request body bytes


@dataclass(frozen=True, slots=True)
class Policy:
    providers: tuple[Provider, ...]
    unmatched: UnmatchedMode = "tunnel"
    limits: ListenerLimits = field(default_factory=ListenerLimits)
    # Addresses exempt from the metadata-address block (explicitly named by the operator).
    allow_networks: tuple[IPNetwork, ...] = ()
    addons: tuple[str, ...] = ()  # "pkg.module", "pkg.module:Class" or a .py path
    alerts: Alerts | None = None
    redis: RedisConfig | None = None
    caller_header: str | None = None  # names the caller (shared deployments); else Proxy-Authorization's user
    prices: tuple[tuple[str, Price], ...] = ()  # overrides of the shipped price table
    secret_stores: SecretStores = field(default_factory=SecretStores)  # where vault:/aws-sm:/azure-kv: read
    source: str = "<memory>"
    # sha256 of the file's bytes, first 12 hex digits: tells one edit from another
    # (not the schema's ``version:``, which is always SCHEMA_VERSION)
    digest: str = ""
    matcher: HostMatcher = field(init=False, repr=False, compare=False)
    # Every provider's placeholder name -> that provider's name (the loader
    # keeps names unique); empty: no request is scanned for placeholders.
    placeholder_owners: dict[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "matcher", HostMatcher(self.providers))
        owners = {name: p.name for p in self.providers for name, _ref in p.placeholders}
        object.__setattr__(self, "placeholder_owners", owners)

    def match(self, host: str) -> Provider | None:
        return self.matcher.match(host)

    def provider(self, name: str) -> Provider | None:
        for p in self.providers:
            if p.name == name:
                return p
        return None


def normalize_host(host: str) -> str:
    """Lower-case, no trailing dot, no IPv6 brackets: the form we compare."""
    host = host.strip().lower().rstrip(".")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host


class HostMatcher:
    """Exact names win over wildcards; among wildcards the longest suffix wins.

    ``*.example.com`` matches ``a.example.com`` and ``a.b.example.com`` but not
    ``example.com`` itself (as in mitmproxy's and Envoy's domain matching).
    Duplicate patterns are rejected by the loader, so the result is unambiguous.
    """

    __slots__ = ("_exact", "_wildcards", "_cache")

    def __init__(self, providers: tuple[Provider, ...]) -> None:
        self._exact: dict[str, Provider] = {}
        wildcards: list[tuple[str, Provider]] = []
        for p in providers:
            for pattern in p.hosts:
                if pattern.startswith("*."):
                    wildcards.append((pattern[1:], p))  # ".example.com"
                else:
                    self._exact.setdefault(pattern, p)
        wildcards.sort(key=lambda item: len(item[0]), reverse=True)
        self._wildcards = tuple(wildcards)
        self._cache: dict[str, Provider | None] = {}

    def match(self, host: str) -> Provider | None:
        cached = self._cache.get(host, self)
        if cached is not self:
            return cached  # type: ignore[return-value]
        found = self._match(normalize_host(host))
        if len(self._cache) < 4096:  # bounded: hosts come from callers
            self._cache[host] = found
        return found

    def _match(self, host: str) -> Provider | None:
        exact = self._exact.get(host)
        if exact is not None:
            return exact
        for suffix, provider in self._wildcards:
            if host.endswith(suffix) and len(host) > len(suffix):
                return provider
        return None
