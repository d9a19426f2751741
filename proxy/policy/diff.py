"""Provider-level differences between two policy views (admin API shape)."""

from __future__ import annotations

from typing import Any


def diff_providers(
    old: list[dict[str, Any]], new: list[dict[str, Any]]
) -> tuple[list[str], list[str], list[tuple[str, list[str]]]]:
    """(added, removed, [(changed provider, fields that differ)]), in file order."""
    before = {p["name"]: p for p in old}
    after = {p["name"]: p for p in new}
    added = [name for name in after if name not in before]
    removed = [name for name in before if name not in after]
    changed = []
    for name, view in after.items():
        if name in before:
            fields = [k for k in view if k != "secret_available" and view[k] != before[name].get(k)]
            if fields:
                changed.append((name, fields))
    return added, removed, changed
