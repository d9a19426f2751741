"""What the caller asked of the cache, and what may be stored. Pure code.

Caller headers (all removed before the request goes upstream):
``x-sidekey-cache: no-cache`` (bypass the lookup, refresh the entry),
``x-sidekey-cache: no-store`` (answer as usual, write nothing),
``x-sidekey-cache-ttl: N`` (seconds; only lowers the provider's ttl), and the
standard ``Cache-Control: no-cache / no-store / max-age=N`` (RFC 9111 §5.2.1).

An answer is stored only when its status is listed (200 by default), it
sets no cookie, it does not say ``no-store`` or ``private`` (RFC 9111
§5.2.2.3, §5.2.2.7), and a stream ended with its terminating event and no
error event (``addons.cache.sse``).
"""

from __future__ import annotations

from dataclasses import dataclass

from multidict import CIMultiDict

from proxy.policy import CachePolicy

CACHE_HEADER = "x-sidekey-cache"
TTL_HEADER = "x-sidekey-cache-ttl"
CALLER_HEADERS = (CACHE_HEADER, TTL_HEADER, "cache-control", "pragma")


@dataclass(frozen=True, slots=True)
class Directives:
    lookup: bool = True  # may be answered from the cache
    store: bool = True  # the answer may be written
    ttl: float = 0.0  # seconds an entry written now stays fresh


def directives(headers: CIMultiDict[str], policy: CachePolicy) -> Directives:
    """Read and remove the caller's cache headers."""
    lookup = store = True
    ttl = policy.ttl
    words = [w for value in headers.popall(CACHE_HEADER, ()) for w in _words(value)]
    for value in headers.popall("cache-control", ()):
        for word in _words(value):
            if word.startswith("max-age="):
                ttl = _lower(ttl, word[8:])
            else:
                words.append(word)
    if "no-store" in words:
        lookup = store = False  # nothing written, nothing shared with it either
    elif "no-cache" in words:
        lookup = False
    for value in headers.popall(TTL_HEADER, ()):
        ttl = _lower(ttl, value)
    if any("no-cache" in _words(v) for v in headers.popall("pragma", ())):  # RFC 9111 §5.4, HTTP/1.0 callers
        lookup = False
    if ttl <= 0:
        store = False
    return Directives(lookup, store, ttl)


def _words(value: str) -> list[str]:
    return [w.strip().lower() for w in value.split(",") if w.strip()]


def _lower(ttl: float, text: str) -> float:
    """A caller's ttl only lowers the provider's; garbage is ignored."""
    text = text.strip()
    if not text.isdigit():
        return ttl
    return min(ttl, float(int(text)))


def storable_head(status: int, headers: CIMultiDict[str], policy: CachePolicy) -> bool:
    """Whether an answer with this head may be stored (the body is judged later)."""
    if status not in policy.statuses or "set-cookie" in headers:
        return False
    for value in headers.getall("cache-control", ()):
        for word in _words(value):
            if word in ("no-store", "private") or word.startswith(("private=", "no-store=")):
                return False
    return "vary" not in headers or headers["vary"].strip() in ("", "accept-encoding", "Accept-Encoding")


# Response fields never replayed from an entry: each answer gets its own.
NOT_REPLAYED = frozenset({"date", "age", "connection", "keep-alive", "transfer-encoding", "content-length",
                          "x-sidekey-request-id", "x-sidekey-attempts", "x-sidekey-cache", "set-cookie"})  # fmt: skip


# Quota headers (the upstream's and our limits'): they describe the moment of
# the miss; a hit takes nothing from any quota, so it reports none.
NOT_REPLAYED_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-", "retry-after")


def replayed_headers(headers: CIMultiDict[str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in headers.items()
                 if k.lower() not in NOT_REPLAYED and not k.lower().startswith(NOT_REPLAYED_PREFIXES))  # fmt: skip
