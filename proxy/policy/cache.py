"""The ``cache:`` block of a provider: what may be cached, for how long, where
(``proxy.policy.model.CachePolicy``; the cache itself is ``addons/cache``).

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
      coalesce: true                # identical requests in flight wait for the first (cluster: across
                                    # the sidecars sharing the Redis backend too)
      count_hits: none              # caller: hits count in the caller's request rules (caller_limits)
      scope: upstream               # or caller: each caller has its own entries
      vary: [anthropic-version]     # replaces the default list of answer-changing headers
      statuses: [200]
"""

from __future__ import annotations

import re

import yaml

from proxy.policy.fields import ABS_PATH, Reader, join
from proxy.policy.model import CachePolicy

FIELDS = frozenset(
    {"ttl", "methods", "paths", "max_entry_bytes", "max_bytes", "backend", "stale_if_error", "coalesce", "scope",
     "vary", "statuses", "count_hits"}
)  # fmt: skip
_METHOD = re.compile(r"GET|HEAD|POST|QUERY")  # the methods whose answers may be cached


def read(r: Reader, node: yaml.Node, field: str) -> CachePolicy:
    """``providers.NAME.cache``."""
    d = CachePolicy()
    f = r.mapping(node, field, FIELDS)

    method = r.matching(_METHOD, "an HTTP method", "expected GET, HEAD, POST or QUERY")
    path = r.matching(ABS_PATH, "a path", "expected an absolute path such as /v1/chat/completions")
    status = r.in_range(200, 499, "expected a status from 200 to 499 (errors of the upstream are never cached)")

    def coalesce(n: yaml.Node, where: str) -> str:
        if isinstance(n, yaml.ScalarNode) and n.tag.endswith(":bool"):
            return "local" if r.flag(n, where) else "off"
        return r.choice(n, where, ("cluster",))

    ttl = r.opt(f, field, "ttl", r.duration, d.ttl)
    max_entry = r.opt(f, field, "max_entry_bytes", r.size, d.max_entry_bytes)
    max_bytes = r.opt(f, field, "max_bytes", r.size, d.max_bytes)
    if max_entry > max_bytes and "max_entry_bytes" in f:
        r.problem(f["max_entry_bytes"], join(field, "max_entry_bytes"), "must not exceed max_bytes")
    backend = r.opt(f, field, "backend", lambda n, w: r.choice(n, w, ("memory", "redis")), "memory")
    scope = r.opt(f, field, "scope", lambda n, w: r.choice(n, w, ("upstream", "caller")), "upstream")
    methods = r.each(f.get("methods"), join(field, "methods"), method) if "methods" in f else d.methods
    coalescing = r.opt(f, field, "coalesce", coalesce, "local")
    if coalescing == "cluster" and backend != "redis":
        r.problem(f["coalesce"], join(field, "coalesce"), "cluster needs backend: redis")
    count_hits = r.opt(f, field, "count_hits", lambda n, w: r.choice(n, w, ("none", "caller")), "none")
    return CachePolicy(
        ttl=ttl,
        methods=methods,
        paths=r.each(f.get("paths"), join(field, "paths"), path) if "paths" in f else d.paths,
        max_entry_bytes=max_entry,
        max_bytes=max_bytes,
        backend="redis" if backend == "redis" else "memory",
        stale_if_error=r.opt(f, field, "stale_if_error", lambda n, w: r.duration(n, w, zero_ok=True), 0.0),
        coalesce=coalescing != "off",
        coalesce_cluster=coalescing == "cluster",
        count_hits="caller" if count_hits == "caller" else "none",
        scope="caller" if scope == "caller" else "upstream",
        vary=r.each(f.get("vary"), join(field, "vary"), r.token) if "vary" in f else d.vary,
        statuses=r.each(f.get("statuses"), join(field, "statuses"), status) if "statuses" in f else d.statuses,
    )
