"""The cache key: a digest of everything that can change an answer, and nothing else.

Parts, each length-framed so no two different part lists hash alike:
provider, the upstream credentials' identity (keyed hashes of the secrets,
never a secret: ``CredentialInjector.credential_digest``), the caller (``scope: caller``), method, path, the query
with its parameters sorted, the provider-listed headers that change the
answer, and the body. A JSON body is canonicalised: sorted keys, no
insignificant whitespace, numbers as parsed (``1`` and ``1.0`` stay apart,
``1e2`` and ``100.0`` meet); one with duplicate keys or NaN is taken byte for
byte, since providers disagree on which duplicate wins. Other bodies are
byte-exact.

Pure code: no I/O, no clock.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from multidict import CIMultiDict

if TYPE_CHECKING:
    from proxy.capabilities import Secrets
    from proxy.policy import Provider

_SEP = b"\x00"


class _NotCanonical(ValueError):
    pass


def _pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in pairs:
        if name in out:
            raise _NotCanonical  # a duplicate key: which one the upstream uses is its choice
        out[name] = value
    return out


def _constant(_name: str) -> Any:
    raise _NotCanonical  # NaN / Infinity are not JSON (RFC 8259 §6)


def canonical_json(body: bytes) -> bytes | None:
    """The canonical form of a JSON body, or None when it is not plain JSON."""
    try:
        value = json.loads(body, object_pairs_hook=_pairs, parse_constant=_constant)
    except (ValueError, RecursionError):  # _NotCanonical is a ValueError, like JSONDecodeError
        return None
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def canonical_body(body: bytes, content_type: str) -> bytes:
    if body and "json" in content_type.lower():
        canonical = canonical_json(body)
        if canonical is not None:
            return b"j" + canonical
    return b"b" + body  # byte-exact, told apart from a canonical JSON text


def sorted_query(target: str) -> tuple[str, str]:
    """(path, query with its ``&``-separated parameters sorted), raw encoding kept."""
    path, _, query = target.partition("?")
    return path, "&".join(sorted(p for p in query.split("&") if p))


def cache_key(
    *,
    provider: str,
    identity: str,
    caller: str | None,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    vary: Iterable[str],
    body: bytes,
) -> str:
    """The entry's name: hex sha256 over the framed parts."""
    path, query = sorted_query(target)
    h = hashlib.sha256()

    def part(data: bytes) -> None:
        h.update(b"%d:" % len(data))
        h.update(data)

    for text in (provider, identity, caller if caller is not None else "\x00-", method, path, query):
        part(text.encode("utf-8", "surrogateescape"))
    for name in sorted(vary):
        values = headers.getall(name, ())
        joined = _SEP.join(v.strip().encode("utf-8", "surrogateescape") for v in values)
        part(name.encode() + b"#%d" % len(values) + _SEP + joined)
    part(canonical_body(body, headers.get("content-type", "")))
    return h.hexdigest()


def group_identity(secrets: Secrets | None, provider: Provider, key: bytes) -> str:
    """Whose answer it is: the keyed hashes (under ``key``) of the group's credentials.

    Per request, not per attempt, on purpose: a hit must answer before the
    limits and the forwarder run, and every member of one provider's group
    may answer any of its requests, so the group is the tenant. Another key
    (a rotation included), provider or tenant gives another identity; a
    fallback provider's answer is never stored."""
    if provider.auth.type == "none" or secrets is None:
        return "none"
    parts = [secrets.credential_digest(provider, t, key) or "-" for t in provider.targets]
    return parts[0] if len(parts) == 1 else ",".join(sorted(parts))
