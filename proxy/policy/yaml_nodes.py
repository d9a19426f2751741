"""The policy loader's first step: YAML text to nodes (PyYAML's compose, never load).

Problems are reported by line through a callback (``Reader.problem``), in words
that never quote the file beyond a single character: a misplaced value may be a secret.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import yaml

# Tag the loader gives an alias (``*name``) instead of resolving it: an alias
# puts one node in two places, so its problems would be reported at the line
# of the anchor rather than where it is used. Aliases are rejected.
ALIAS_TAG = "!sidekey/alias"
_QUOTED = re.compile(r"'([^']*)'|\"([^\"]*)\"")

Problem = Callable[[int, str, str], object]


# -- text to nodes --------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """A SafeLoader that leaves aliases unresolved, marked with ``ALIAS_TAG``
    where they are used, so the readers can reject them at the right line."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.get_event()  # type: ignore[no-untyped-call]  # untyped in types-PyYAML
            return yaml.ScalarNode(ALIAS_TAG, "", event.start_mark, event.end_mark)
        return super().compose_node(parent, index)


def compose(raw: bytes, problem: Problem) -> yaml.Node | None:
    """The root node, or None with the problem recorded through ``problem(line, field, message)``
    (``Reader.problem``)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        problem(raw.count(b"\n", 0, exc.start) + 1, "(file)", "not UTF-8 text")
        return None
    loader = None
    try:
        loader = _Loader(text)  # checks for unprintable characters
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 1
        what = _redact(exc.problem)
        if exc.context:  # e.g. "while scanning a quoted scalar", often on an earlier line
            start = exc.context_mark.line + 1 if exc.context_mark else line
            what = f"{_redact(exc.context)}{f' (line {start})' if start != line else ''}: {what}"
        problem(line, "(file)", f"not valid YAML: {what}")
        return None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        problem(line, "(file)", "a control character YAML does not allow (only tab and newline)")
        return None
    except yaml.YAMLError:
        problem(1, "(file)", "not valid YAML")
        return None
    except RecursionError:
        # PyYAML's scanner and composer recurse once per nesting level: a few hundred
        # levels exhaust the stack. The scanner's position is where it gave up.
        line = loader.line + 1 if loader is not None else 1
        problem(line, "(file)", "nested too deeply (lists and mappings inside each other)")
        return None
    finally:
        if loader is not None:
            loader.dispose()
    if root is None:
        problem(1, "(file)", "empty policy: expected a mapping starting with 'version: 1'")
    return root


def _redact(problem: str | None) -> str:
    """PyYAML's own words, minus anything it quotes from the file beyond a
    single character or a token name like '<block end>'."""

    def keep(match: re.Match[str]) -> str:
        inner = match.group(1) if match.group(1) is not None else match.group(2)
        short = len(inner) <= 1 or (inner.startswith("\\") and len(inner) <= 6)
        return match.group(0) if short or re.fullmatch(r"<[a-z ]+>", inner) else "'...'"

    return _QUOTED.sub(keep, problem) if problem else "check indentation, quotes and brackets"
