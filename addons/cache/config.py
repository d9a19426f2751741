"""The ``cache:`` block of a provider: what may be cached, for how long, where.

Read by the policy loader (``proxy.policy.load``) with the same conventions as
every other block: each problem names file, line and field, and never repeats
the value. Off unless the provider has a ``cache:`` block.

    cache:
      ttl: 10m                      # the longest an entry is fresh
      paths: [/v1/chat/completions] # POST paths that may be cached (GET/HEAD always)
      max_entry_bytes: 1MiB         # larger answers stream through, uncached
      max_bytes: 64MiB              # the memory backend's bound (LRU by bytes)
      backend: memory               # or redis (the policy's ``redis:``)
      stale_if_error: 1h            # an expired entry still serves when every upstream failed
      coalesce: true                # identical requests in flight wait for the first
      scope: upstream               # or caller: each caller has its own entries
      vary: [anthropic-version]     # replaces the default list of answer-changing headers
      statuses: [200]
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import yaml

from proxy.policy.fields import join

if TYPE_CHECKING:
    from proxy.policy.load import _Builder

Backend = Literal["memory", "redis"]
Scope = Literal["upstream", "caller"]

FIELDS = frozenset(
    {"ttl", "methods", "paths", "max_entry_bytes", "max_bytes", "backend", "stale_if_error", "coalesce", "scope",
     "vary", "statuses"}
)  # fmt: skip
# Request headers that change an AI provider's answer. ``accept-encoding`` is
# here because an entry is stored as the upstream encoded it.
DEFAULT_VARY = (
    "accept",
    "accept-encoding",
    "content-type",
    "anthropic-version",
    "anthropic-beta",
    "openai-organization",
    "openai-project",
    "openai-beta",
)
DEFAULT_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/messages", "/v1/responses")
_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")
_METHOD = re.compile(r"[A-Z]{1,16}")


@dataclass(frozen=True, slots=True)
class CachePolicy:
    ttl: float = 300.0
    methods: tuple[str, ...] = ("GET", "HEAD")  # cached on every path
    paths: tuple[str, ...] = DEFAULT_PATHS  # where POST is cached too
    max_entry_bytes: int = 1024 * 1024
    max_bytes: int = 64 * 1024 * 1024
    backend: Backend = "memory"
    stale_if_error: float = 0.0
    coalesce: bool = True
    scope: Scope = "upstream"
    vary: tuple[str, ...] = DEFAULT_VARY  # lower-case
    statuses: tuple[int, ...] = (200,)

    def method_cached(self, method: str, path: str) -> bool:
        """Whether a request may be answered from (and stored in) the cache."""
        if method in self.methods:
            return True
        return method == "POST" and path.split("?", 1)[0] in self.paths


def read(b: _Builder, node: yaml.Node, field: str) -> CachePolicy:
    """``providers.NAME.cache``."""
    r, d = b.r, CachePolicy()
    f = r.mapping(node, field, FIELDS)

    def method(n: yaml.Node, where: str) -> str:
        value = r.scalar(n, where, "an HTTP method")
        if not _METHOD.fullmatch(value) or value not in ("GET", "HEAD", "POST", "QUERY"):
            raise r.problem(n, where, "expected GET, HEAD, POST or QUERY")
        return value

    def path(n: yaml.Node, where: str) -> str:
        value = r.scalar(n, where, "a path")
        if not _PATH.fullmatch(value):
            raise r.problem(n, where, "expected an absolute path such as /v1/chat/completions")
        return value

    def status(n: yaml.Node, where: str) -> int:
        code = r.integer(n, where, minimum=200)
        if code > 499:
            raise r.problem(n, where, "expected a status from 200 to 499 (errors of the upstream are never cached)")
        return code

    def coalesce(n: yaml.Node, where: str) -> bool:
        if isinstance(n, yaml.ScalarNode) and n.tag.endswith(":bool"):
            return b.flag(n, where)
        return r.choice(n, where, ("cluster",)) == "cluster"  # cluster: local, and across sidecars when built

    ttl = b.opt(f, field, "ttl", r.duration, d.ttl)
    max_entry = b.opt(f, field, "max_entry_bytes", r.size, d.max_entry_bytes)
    max_bytes = b.opt(f, field, "max_bytes", r.size, d.max_bytes)
    if max_entry > max_bytes and "max_entry_bytes" in f:
        r.problem(f["max_entry_bytes"], join(field, "max_entry_bytes"), "must not exceed max_bytes")
    backend = b.opt(f, field, "backend", lambda n, w: r.choice(n, w, ("memory", "redis")), "memory")
    scope = b.opt(f, field, "scope", lambda n, w: r.choice(n, w, ("upstream", "caller")), "upstream")
    methods = b.each(f.get("methods"), join(field, "methods"), method) if "methods" in f else d.methods
    return CachePolicy(
        ttl=ttl,
        methods=methods,
        paths=b.each(f.get("paths"), join(field, "paths"), path) if "paths" in f else d.paths,
        max_entry_bytes=max_entry,
        max_bytes=max_bytes,
        backend="redis" if backend == "redis" else "memory",
        stale_if_error=b.opt(f, field, "stale_if_error", lambda n, w: r.duration(n, w, zero_ok=True), 0.0),
        coalesce=b.opt(f, field, "coalesce", coalesce, d.coalesce),
        scope="caller" if scope == "caller" else "upstream",
        vary=b.each(f.get("vary"), join(field, "vary"), r.token) if "vary" in f else d.vary,
        statuses=b.each(f.get("statuses"), join(field, "statuses"), status) if "statuses" in f else d.statuses,
    )

