"""Placeholders anywhere in a request: the pure core (no I/O, no asyncio).

A provider's ``placeholders:`` maps a name such as ``SIDEKEY_SLACK_WEBHOOK_TOKEN``
to a credential source. The caller puts the name where the secret goes (a URL
path, a query value, a header, a JSON string, a form field); sidekey puts the
value there on requests to that provider's hosts only, and refuses a request
that carries a known name anywhere else (``placeholder_misdirected``).

The shape rule makes a name unmistakable: ``SIDEKEY_`` and 8 to 64 of
``A-Z 0-9 _``, checked at policy load (``NAME``). In a request a name counts
only as a whole token: not preceded or followed by a letter, digit or ``_``
(``SCAN``), so ``XSIDEKEY_...`` or ``SIDEKEY_..._V2`` is another string. All
of its characters are unreserved in URLs (RFC 3986 §2.3), so it is never
percent-encoded by a client and is matched as written.

The scan is one substring test for the prefix per place (path, header values,
body); only text that holds the prefix is searched with the regex, and each
match is one dict lookup among the policy's names.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, unquote_plus

PREFIX = "SIDEKEY_"
PREFIX_BYTES = PREFIX.encode()
NAME = re.compile(r"SIDEKEY_[A-Z0-9_]{8,64}")  # a policy's names must fullmatch this
SCAN = re.compile(r"(?<![A-Za-z0-9_])SIDEKEY_[A-Z0-9_]{8,64}(?![A-Za-z0-9_])")
SCAN_BYTES = re.compile(SCAN.pattern.encode())
NAME_RULE = "SIDEKEY_ followed by 8 to 64 of A-Z, 0-9, '_'"

# RFC 3986 §3.3: a path segment may hold pchar = unreserved / pct-encoded /
# sub-delims / ":" / "@"; "/" is kept because a webhook's secret spans segments
# (Slack: T.../B.../XXXX). Everything else, "?" and "#" included, is encoded.
PATH_SAFE = "/:@!$&'()*+,;="
JSON_TYPE = "application/json"
FORM_TYPE = "application/x-www-form-urlencoded"


class BadValue(ValueError):
    """A placeholder's value cannot be put where the placeholder is (a line
    break in a header value). Carries no part of the value."""


def names_in(text: str, owners: Mapping[str, str]) -> list[str]:
    """The known placeholder names in ``text``, in order (repeats kept)."""
    if PREFIX not in text:
        return []
    return [m for m in SCAN.findall(text) if m in owners]


def names_in_bytes(data: bytes, owners: Mapping[str, str]) -> list[str]:
    if PREFIX_BYTES not in data:
        return []
    return [name for m in SCAN_BYTES.findall(data) if (name := m.decode("ascii")) in owners]


def misdirected(names: Iterable[str], owners: Mapping[str, str], provider: str | None) -> str | None:
    """The first name that does not belong to ``provider`` (None: an unmatched host)."""
    for name in names:
        if owners[name] != provider:
            return name
    return None


def _replace(text: str, values: Mapping[str, str], encode: Callable[[str], str]) -> str:
    if PREFIX not in text:
        return text
    return SCAN.sub(lambda m: encode(values[m[0]]) if m[0] in values else m[0], text)


def in_url(url: str, values: Mapping[str, str]) -> str:
    """The URL with each placeholder in its path and query replaced by its value,
    percent-encoded for where it stands (the path keeps ``/``; a query value
    keeps nothing but unreserved characters). Other bytes are kept as they were."""
    if PREFIX not in url:
        return url
    scheme, sep, rest = url.partition("://")
    cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
    authority, target = rest[:cut], rest[cut:]
    path, qmark, query = target.partition("?")
    path = _replace(path, values, lambda v: quote(v, safe=PATH_SAFE))
    if qmark:
        query = _replace(query, values, lambda v: quote(v, safe=""))
    return f"{scheme}{sep}{authority}{path}{qmark}{query}"


def in_header(value: str, values: Mapping[str, str]) -> str:
    """A header value with its placeholders replaced. RFC 9110 §5.5: a field
    value never holds CR, LF or NUL; a secret that does is refused (BadValue),
    never sent to split the header section."""

    def check(v: str) -> str:
        if "\r" in v or "\n" in v or "\0" in v:
            raise BadValue("a placeholder value holds a line break or NUL")
        return v

    return _replace(value, values, check)


def media_type(content_type: str | None) -> str:
    return (content_type or "").partition(";")[0].strip().lower()


def substitutable(content_type: str | None) -> bool:
    """Whether a body of this type is substituted (parsed, never a byte replace)."""
    kind = media_type(content_type)
    return kind in (FORM_TYPE, JSON_TYPE) or (kind.startswith("application/") and kind.endswith("+json"))


def in_body(body: bytes, content_type: str | None, values: Mapping[str, str]) -> bytes:
    """A JSON or form body with its placeholders replaced; any other body, or
    one that does not parse, as it was."""
    if PREFIX_BYTES not in body:
        return body
    if media_type(content_type) == FORM_TYPE:
        return in_form(body, values)
    return in_json(body, values)


def in_json(body: bytes, values: Mapping[str, str]) -> bytes:
    """Placeholders in the JSON document's string values (keys are left), then
    the document serialised again: the value is escaped as JSON requires,
    whatever it holds. A body that is not JSON is returned as it was."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    changed = False

    def walk(node: Any) -> Any:
        nonlocal changed
        if isinstance(node, str):
            out = _replace(node, values, str)
            changed = changed or out != node
            return out
        if isinstance(node, list):
            return [walk(item) for item in node]
        if isinstance(node, dict):
            return {key: walk(item) for key, item in node.items()}
        return node

    doc = walk(doc)
    if not changed:
        return body
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":")).encode()


def in_form(body: bytes, values: Mapping[str, str]) -> bytes:
    """Placeholders in ``application/x-www-form-urlencoded`` values, field by
    field (WHATWG URL §5.1): a field holding one is decoded, substituted and
    encoded again; every other field is kept byte for byte."""
    try:
        text = body.decode("ascii")
    except UnicodeDecodeError:  # a conforming form body is ASCII: leave anything else alone
        return body
    fields = text.split("&")
    for i, field in enumerate(fields):
        if PREFIX not in field:
            continue
        name, eq, value = field.partition("=")
        decoded = unquote_plus(value)
        out = _replace(decoded, values, str)
        if out != decoded:
            fields[i] = f"{name}{eq}{quote_plus(out, safe='')}"
    return "&".join(fields).encode("ascii")
