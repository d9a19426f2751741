"""Field readers for the policy loader: each takes a YAML node and a dotted
field path, returns a typed value or records a problem.

Messages say what was expected, never what was found: a misplaced value in a
policy file may be a secret.
"""

from __future__ import annotations

import re
from typing import NamedTuple

import yaml

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|KiB|MiB|GiB)?\Z")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\Z")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "MB": 1000**2, "GB": 1000**3, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3}
_DURATION_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class PolicyProblem(NamedTuple):
    path: str
    line: int
    field: str
    message: str


class Invalid(Exception):
    """Raised by a reader after it recorded its problem: skip this field."""


class Reader:
    """Collects problems against one source file."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[PolicyProblem] = []

    def problem(self, node: yaml.Node | None, field: str, message: str) -> Invalid:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(PolicyProblem(self.source, line, field, message))
        return Invalid()

    # -- shapes ------------------------------------------------------------
    def mapping(self, node: yaml.Node, field: str, allowed: frozenset[str]) -> dict[str, yaml.Node]:
        if not isinstance(node, yaml.MappingNode):
            raise self.problem(node, field, "expected a mapping")
        out: dict[str, yaml.Node] = {}
        for key_node, value_node in node.value:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            where = f"{field}.{key}" if field and key else (key or field)
            if not isinstance(key, str):
                self.problem(key_node, field, "keys must be plain strings")
            elif key in out:
                self.problem(key_node, where, "duplicate key")
            elif allowed and key not in allowed:
                self.problem(key_node, where, f"unknown field (expected one of: {', '.join(sorted(allowed))})")
            else:
                out[key] = value_node
        return out

    def seq(self, node: yaml.Node, field: str) -> list[yaml.Node]:
        if not isinstance(node, yaml.SequenceNode):
            raise self.problem(node, field, "expected a list")
        return list(node.value)

    def scalar(self, node: yaml.Node, field: str, what: str = "a string") -> str:
        if not isinstance(node, yaml.ScalarNode) or node.tag == "tag:yaml.org,2002:null":
            raise self.problem(node, field, f"expected {what}")
        return str(node.value)

    # -- typed values --------------------------------------------------------
    def string(self, node: yaml.Node, field: str) -> str:
        value = self.scalar(node, field)
        if _CTL.search(value):
            raise self.problem(node, field, "control characters (CR, LF, NUL, ...) are not allowed")
        return value

    def token(self, node: yaml.Node, field: str, what: str = "a header name") -> str:
        value = self.scalar(node, field, what)
        if not _TOKEN.match(value):
            raise self.problem(node, field, f"expected {what}")
        return value.lower()

    def choice(self, node: yaml.Node, field: str, options: tuple[str, ...]) -> str:
        value = self.scalar(node, field, f"one of: {', '.join(options)}")
        if value not in options:
            raise self.problem(node, field, f"expected one of: {', '.join(options)}")
        return value

    def integer(self, node: yaml.Node, field: str, minimum: int = 0) -> int:
        value = self.scalar(node, field, "a whole number")
        if node.tag != "tag:yaml.org,2002:int" or not value.isdigit() or int(value) < minimum:
            raise self.problem(node, field, f"expected a whole number >= {minimum}")
        return int(value)

    def size(self, node: yaml.Node, field: str) -> int:
        """Bytes: 65536, "64KiB", "2GiB", "500KB"."""
        match = _SIZE.match(self.scalar(node, field, "a size").strip())
        if not match or float(match.group(1)) <= 0:
            raise self.problem(node, field, "expected a size in bytes > 0, e.g. 65536, 64KiB, 2GiB")
        return int(float(match.group(1)) * _SIZE_UNITS[match.group(2)])

    def duration(self, node: yaml.Node, field: str) -> float:
        """Seconds: 10, 2.5, "500ms", "10s", "2m"."""
        match = _DURATION.match(self.scalar(node, field, "a duration").strip())
        if not match or float(match.group(1)) <= 0:
            raise self.problem(node, field, "expected a duration > 0, e.g. 10, 2.5, 500ms, 10s, 2m")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
