"""The policy loader's lower half: YAML text to nodes, and one reader per kind
of value. Each reader takes a node and a dotted field path and returns a typed
value, or records a problem and raises ``Invalid``.

Messages say what was expected, never what was found: a misplaced value in a
policy file may be a secret. Keys are names, not values, so a key may appear
in a field path; a key that does not look like a name is shown by position.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar
from urllib.parse import urlsplit

import yaml

from proxy.policy.model import IPNetwork, SecretRef, Upstream, normalize_host
from proxy.policy.yaml_nodes import ALIAS_TAG

_NULL_TAG = "tag:yaml.org,2002:null"
_INT_TAG = "tag:yaml.org,2002:int"

# Headers that frame the message (RFC 9112 6) or are hop-by-hop (RFC 9110 7.6.1):
# the proxy owns them, so a policy may not set them or carry a credential in them.
FRAMING = frozenset({"host", "content-length", "transfer-encoding"})
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade"})

# RFC 9110 5.6.2: token = 1*tchar
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SAFE_KEY = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # keys shown verbatim in field paths
# RFC 9110 5.5: a field value never holds CR, LF or NUL; other C0 controls
# (HTAB aside) are as useless, and are how header injection gets smuggled.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# RFC 1123 labels; '_' tolerated because real service hosts use it.
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?")
_SIZE_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
_SIZE_UNITS.update({"KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40})
_DURATION = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_ENV = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PARAM = re.compile(r"[A-Za-z0-9._~-]+")  # RFC 3986 unreserved: never needs escaping
_ADDON = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*(?::[A-Za-z_]\w*)?")
_URL_PATH = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")  # RFC 3986 3.3 path characters
ABS_PATH = re.compile(r"/[A-Za-z0-9\-._~!$&'()*+,;=:@%/]*")  # an absolute path of those characters
METHOD = re.compile(r"[A-Z]{1,16}")  # an HTTP method as sent: a token, in capitals


T = TypeVar("T")
Fields = dict[str, yaml.Node]
Read = Callable[[yaml.Node, str], T]


class PolicyProblem(NamedTuple):
    path: str
    line: int  # 1-based
    field: str  # dotted path, e.g. providers.openai.auth.header
    message: str  # what was expected; never the value found


class Invalid(Exception):
    """Raised by a reader after it recorded its problem: skip this field."""


def line_of(node: yaml.Node) -> int:
    mark = node.start_mark
    return mark.line + 1 if mark is not None else 1


def join(field: str, key: str) -> str:
    if not field:
        return key
    return f"{field}{key}" if key.startswith("[") else f"{field}.{key}"


def parse_size(text: str) -> int | None:
    """``65536``, ``"64KiB"``, ``"500KB"`` (decimal), ``"2GiB"`` -> bytes; None unless >= 1."""
    match = _SIZE.fullmatch(text.strip().replace("_", ""))
    if match is None:
        return None
    value = int(float(match.group(1)) * _SIZE_UNITS[match.group(2) or "B"])
    return value if value >= 1 else None


def parse_duration(text: str, *, zero_ok: bool = False) -> float | None:
    """``10``, ``2.5``, ``"500ms"``, ``"10s"``, ``"2m"``, ``"1h"`` -> seconds; None unless > 0
    (or >= 0 with ``zero_ok``: ``0``, ``0.0``, ``"0s"`` and ``"0ms"`` alike)."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        return None
    value = float(match.group(1)) * _DURATION_UNITS[match.group(2) or "s"]
    return value if value > 0 or (zero_ok and value == 0) else None


def check_host(value: str, *, wildcard: bool) -> str | None:
    """The host as ``HostMatcher`` compares it (lower-case, no trailing dot or
    brackets, IDNA A-label), or None when it is not a host name or IP literal.
    With ``wildcard``, ``*.suffix`` is allowed too."""
    host = normalize_host(value)
    star = wildcard and host.startswith("*.")
    name = host[2:] if star else host
    if not name.isascii():
        try:  # clients send the A-label in CONNECT and Host, so compare in that form
            name = name.encode("idna").decode("ascii")
        except UnicodeError:
            return None
    try:
        ipaddress.ip_address(name)
    except ValueError:
        if not _HOSTNAME.fullmatch(name):
            return None
    else:
        if star:  # "*.10.0.0.1" has no meaning
            return None
    return f"*.{name}" if star else name


def suggest(key: str, allowed: frozenset[str]) -> str:
    """The nearest valid name (a name from the schema, never the key itself),
    else the whole list."""
    near = difflib.get_close_matches(key, sorted(allowed), n=1)
    return f"did you mean {near[0]}?" if near else f"expected one of: {', '.join(sorted(allowed))}"


# -- one reader per kind of value -------------------------------------------------
class Reader:
    """Collects problems against one source file; relative paths resolve
    against ``base_dir``."""

    def __init__(self, source: str, base_dir: str = "") -> None:
        self.source = source
        self.base_dir = base_dir or os.getcwd()
        self.problems: list[PolicyProblem] = []
        # reference kinds a credential may name (``SecretStores.configured``: those of the configured stores)
        self.credential_kinds: frozenset[str] = frozenset({"env", "file", "oauth2"})

    def problem(self, node: yaml.Node | int, field: str, message: str) -> Invalid:
        line = node if isinstance(node, int) else line_of(node)
        self.problems.append(PolicyProblem(self.source, line, field, message))
        return Invalid()

    def _plain(self, node: yaml.Node, field: str) -> None:
        if node.tag == ALIAS_TAG:
            raise self.problem(node, field, "YAML aliases (*name) are not supported: write the value out")

    # fields of a mapping: the readers of sections (load, groups, quotas, ...) call these
    def opt(self, fields: Fields, prefix: str, key: str, read: Read[T], default: T, *, null_ok: bool = False) -> T:
        """``fields[key]`` read if present; the default when absent or invalid
        (the problem is recorded), so one bad field does not hide the next.
        ``null_ok``: an empty value (``key:`` or ``null``) means "not set", for
        optional sections whose entries may all be commented out."""
        node = fields.get(key)
        if node is None or (null_ok and self.is_null(node)):
            return default
        try:
            return read(node, join(prefix, key))
        except Invalid:
            return default

    def each(self, node: yaml.Node | None, field: str, read: Read[T]) -> tuple[T, ...]:
        """Every item of a list (absent or null: none); bad items are recorded and skipped."""
        if node is None or self.is_null(node):
            return ()
        try:
            items = self.seq(node, field)
        except Invalid:
            return ()
        out: list[T] = []
        for i, item in enumerate(items):
            try:
                out.append(read(item, f"{field}[{i}]"))
            except Invalid:
                continue
        return tuple(out)

    def flag(self, node: yaml.Node, field: str) -> bool:
        return self.choice(node, field, ("true", "false")) == "true"

    @staticmethod
    def is_null(node: yaml.Node | None) -> bool:
        return node is None or (isinstance(node, yaml.ScalarNode) and node.tag == _NULL_TAG)

    # shapes
    def entries(self, node: yaml.Node, field: str) -> list[tuple[str, str, yaml.Node, yaml.Node]]:
        """``(key, label, key node, value node)`` in file order; ``label`` is
        the key as shown in field paths. Duplicate keys are problems."""
        self._plain(node, field)
        if not isinstance(node, yaml.MappingNode):
            raise self.problem(node, field, "expected a mapping")
        out: list[tuple[str, str, yaml.Node, yaml.Node]] = []
        first_line: dict[str, int] = {}
        for index, (key_node, value_node) in enumerate(node.value):
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag in (ALIAS_TAG, _NULL_TAG):
                self.problem(key_node, join(field, f"[{index}]"), "keys must be plain names")
                continue
            key = str(key_node.value)
            label = key if _SAFE_KEY.fullmatch(key) else f"[{index}]"
            if key in first_line:
                self.problem(key_node, join(field, label), f"duplicate key (first at line {first_line[key]})")
                continue
            first_line[key] = line_of(key_node)
            out.append((key, label, key_node, value_node))
        return out

    def mapping(self, node: yaml.Node, field: str, allowed: frozenset[str]) -> dict[str, yaml.Node]:
        """A mapping with a fixed set of keys; unknown keys are problems."""
        out: dict[str, yaml.Node] = {}
        for key, label, key_node, value_node in self.entries(node, field):
            if key in allowed:
                out[key] = value_node
            else:
                self.problem(key_node, join(field, label), f"unknown field ({suggest(key, allowed)})")
        return out

    def seq(self, node: yaml.Node, field: str) -> list[yaml.Node]:
        self._plain(node, field)
        if not isinstance(node, yaml.SequenceNode):
            raise self.problem(node, field, "expected a list")
        return list(node.value)

    def scalar(self, node: yaml.Node, field: str, what: str = "a string") -> str:
        self._plain(node, field)
        if not isinstance(node, yaml.ScalarNode) or node.tag == _NULL_TAG:
            raise self.problem(node, field, f"expected {what}")
        return str(node.value)  # the text as written: 2.0 stays "2.0", yes stays "yes"

    # scalars
    def string(self, node: yaml.Node, field: str) -> str:
        value = self.scalar(node, field)
        if _CTL.search(value):
            raise self.problem(node, field, "control characters (CR, LF, NUL, ...) are not allowed")
        return value

    def token(self, node: yaml.Node, field: str, what: str = "a header name") -> str:
        """An RFC 9110 token, lower-cased (header names compare case-insensitively)."""
        value = self.scalar(node, field, what)
        if not _TOKEN.fullmatch(value):
            raise self.problem(node, field, f"expected {what}")
        return value.lower()

    def choice(self, node: yaml.Node, field: str, options: tuple[str, ...]) -> str:
        expected = f"one of: {', '.join(options)}"
        if self.scalar(node, field, expected) not in options:
            raise self.problem(node, field, f"expected {expected}")
        return str(node.value)

    def parsed(self, node: yaml.Node, field: str, what: str, parse: Callable[[str], T | None], expected: str) -> T:
        """The scalar ``what`` as ``parse`` reads it; ``expected`` (the form, never the
        value) is the problem when ``parse`` gives None."""
        value = parse(self.scalar(node, field, what))
        if value is None:
            raise self.problem(node, field, expected)
        return value

    def matching(self, pattern: re.Pattern[str], what: str, expected: str) -> Read[str]:
        """A reader of a scalar that ``pattern`` matches in full."""

        def match(value: str) -> str | None:
            return value if pattern.fullmatch(value) else None

        return lambda node, field: self.parsed(node, field, what, match, expected)

    def in_range(self, lowest: int, highest: int, expected: str) -> Read[int]:
        """A reader of a whole number from ``lowest`` to ``highest``; ``expected`` when above."""

        def read(node: yaml.Node, field: str) -> int:
            value = self.integer(node, field, minimum=lowest)
            if value > highest:
                raise self.problem(node, field, expected)
            return value

        return read

    def record(self, node: yaml.Node, field: str, make: Callable[..., T], readers: dict[str, Read[Any]],
               *, null_ok: bool = False) -> T:  # fmt: skip
        """A mapping of the fields ``readers`` read, made into ``make`` (a dataclass whose
        every field has a default): a field left out keeps its default."""
        default = make()
        f = self.mapping(node, field, frozenset(readers))
        opt = self.opt
        return make(**{k: opt(f, field, k, read, getattr(default, k), null_ok=null_ok) for k, read in readers.items()})

    def integer(self, node: yaml.Node, field: str, minimum: int = 0) -> int:
        expected = f"a whole number >= {minimum}"
        value = self.scalar(node, field, expected).replace("_", "")
        if node.tag != _INT_TAG or not value.isdigit() or int(value) < minimum:
            raise self.problem(node, field, f"expected {expected}")
        return int(value)

    def count(self, node: yaml.Node, field: str) -> int:
        return self.integer(node, field, minimum=1)

    def size(self, node: yaml.Node, field: str) -> int:
        expected = "expected a size >= 1 byte, e.g. 65536, 64KiB, 500KB, 2GiB"
        return self.parsed(node, field, "a size", parse_size, expected)

    def duration(self, node: yaml.Node, field: str, *, zero_ok: bool = False) -> float:
        bound = ">= 0" if zero_ok else "> 0"
        expected = f"expected a duration {bound} in seconds, e.g. 10, 2.5, 500ms, 10s, 2m"
        return self.parsed(node, field, "a duration", lambda v: parse_duration(v, zero_ok=zero_ok), expected)

    def host(self, node: yaml.Node, field: str, *, wildcard: bool = False) -> str:
        what = "a host name, an IP address or *.suffix" if wildcard else "a host name or IP address"
        expected = f"expected {what} (no scheme, port or path)"
        return self.parsed(node, field, "a host name", lambda v: check_host(v, wildcard=wildcard), expected)

    def path(self, value: str) -> str:
        # normpath, not resolve(): a Kubernetes Secret/ConfigMap mount is a
        # symlink into a directory that is replaced on update; resolving it
        # would pin the old copy.
        return os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(value)))

    def ip_network(self, node: yaml.Node, field: str) -> IPNetwork:
        try:
            return ipaddress.ip_network(self.scalar(node, field, "an IP address or CIDR").strip(), strict=False)
        except ValueError:
            raise self.problem(node, field, "expected an IP address or CIDR") from None

    def addon(self, node: yaml.Node, field: str) -> str:
        """``pkg.module``, ``pkg.module:Class``, ``file.py`` or ``file.py:Class``
        (the forms ``addons.load_addons`` takes); a file is made absolute."""
        spec = self.string(node, field).strip()
        file, colon, attr = spec.rpartition(":")
        if colon and file.endswith(".py") and attr.isidentifier():
            return f"{self.path(file)}:{attr}"
        if spec.endswith(".py"):
            return self.path(spec)
        if not _ADDON.fullmatch(spec):
            raise self.problem(node, field, "expected pkg.module[:Class] or a path ending in .py[:Class]")
        return spec

    def secret(self, node: yaml.Node, field: str) -> SecretRef:
        kind, _, ref = self.scalar(node, field, "env:NAME or file:PATH").partition(":")
        if kind == "env" and _ENV.fullmatch(ref):
            return SecretRef("env", ref)
        if kind == "file" and ref.strip() and ref.isprintable():
            return SecretRef("file", self.path(ref.strip()))
        raise self.problem(node, field, "expected env:NAME or file:PATH; literal secrets are not allowed")

    def upstream(self, node: yaml.Node, field: str) -> Upstream:
        value = self.string(node, field).strip()
        example = "expected a URL like https://api.example.com[:port][/prefix]"
        if "://" not in value:
            raise self.problem(node, field, example)
        try:
            url = urlsplit(value)
            port = url.port  # ValueError unless a number in 0..65535
        except ValueError:
            raise self.problem(node, field, example) from None
        if url.scheme != "https":
            raise self.problem(node, field, "must be https: credentials are never sent over plaintext")
        if "@" in url.netloc:
            raise self.problem(node, field, "must not carry user info: credentials belong in auth.secret")
        if "?" in value or "#" in value:
            raise self.problem(node, field, "must not carry a query or fragment")
        host = check_host(url.hostname or "", wildcard=False)
        if host is None or port == 0 or not _URL_PATH.fullmatch(url.path):
            raise self.problem(node, field, example)
        return Upstream(host, port or 443, url.path.rstrip("/"))

    def ca_bundle(self, node: yaml.Node, field: str) -> str:
        path = self.path(self.string(node, field))
        if not os.path.isfile(path):  # a path is not a secret: naming it helps
            raise self.problem(node, field, f"file not found: {path}")
        return path

    def credential_header(self, node: yaml.Node, field: str) -> str:
        name = self.token(node, field)
        if name in FRAMING or name in HOP_BY_HOP:
            raise self.problem(node, field, "expected a header name the proxy does not manage itself")
        return name

    def strip_header(self, node: yaml.Node, field: str) -> str:
        name = self.token(node, field)
        if name in FRAMING:
            raise self.problem(node, field, "is needed to frame the request and cannot be stripped")
        return name

    def username(self, node: yaml.Node, field: str) -> str:
        value = self.string(node, field)
        if ":" in value:  # RFC 7617 2: the user-id cannot contain a colon
            raise self.problem(node, field, "must not contain ':'")
        return value

    def param(self, node: yaml.Node, field: str) -> str:
        value = self.scalar(node, field, "a query parameter name")
        if not _PARAM.fullmatch(value):
            raise self.problem(node, field, "expected a query parameter name of A-Z, a-z, 0-9, '-', '.', '_', '~'")
        return value
