"""The import graph of proxy/ and addons/ in numbers (docs/architecture.md): modules,
imports between them, rings of sibling modules that import each other (what the
``no-cycles`` contract forbids), files over 400 lines.

    .venv/bin/python bench/import_graph.py .          # this tree
    .venv/bin/python bench/import_graph.py /tmp/old   # another (git archive REV | tar -x -C /tmp/old)
"""

from __future__ import annotations

import sys
from pathlib import Path

import grimp

PACKAGES = ("proxy", "addons")


def strongly_connected(nodes: list[str], edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; the groups of nodes that reach each other."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []
    for start in nodes:
        if start in index:
            continue
        work = [(start, iter(sorted(edges.get(start, ()))))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, targets = work[-1]
            target = next(targets, None)
            if target is not None:
                if target not in index:
                    index[target] = low[target] = len(index)
                    stack.append(target)
                    on_stack.add(target)
                    work.append((target, iter(sorted(edges.get(target, ())))))
                elif target in on_stack:
                    low[node] = min(low[node], index[target])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.append(member)
                    if member == node:
                        break
                groups.append(sorted(group))
    return groups


def rings(graph: grimp.ImportGraph, modules: set[str]) -> list[tuple[str, list[str]]]:
    """Per package, the groups of its direct children (a subpackage counts as one) that
    import each other, directly or through their submodules."""
    found = []
    packages = {m for m in modules if any(c.startswith(m + ".") for c in modules)}
    for package in sorted(packages):
        depth = package.count(".") + 1

        def child(module: str, depth: int = depth) -> str:
            return ".".join(module.split(".")[: depth + 1])

        inside = [m for m in modules if m.startswith(package + ".")]
        edges: dict[str, set[str]] = {}
        for module in inside:
            for target in graph.find_modules_directly_imported_by(module):
                if target.startswith(package + ".") and child(target) != child(module):
                    edges.setdefault(child(module), set()).add(child(target))
        children = sorted({child(m) for m in inside})
        found += [(package, group) for group in strongly_connected(children, edges) if len(group) > 1]
    return found


def main(root: Path) -> None:
    sys.path.insert(0, str(root))
    graph = grimp.build_graph(*PACKAGES, cache_dir=None)
    modules = set(graph.modules)
    imports = sum(len(graph.find_modules_directly_imported_by(m) & modules) for m in modules)
    sizes = {p: len(p.read_text().splitlines()) for pkg in PACKAGES for p in sorted((root / pkg).rglob("*.py"))}
    big = [f"{p.relative_to(root)} ({n})" for p, n in sizes.items() if n > 400]
    for package, group in rings(graph, modules):
        print(f"ring in {package}: {', '.join(group)}")
    print(f"modules {len(modules)}, imports {imports}, rings {len(rings(graph, modules))}, lines {sum(sizes.values())}")
    print(f"files over 400 lines: {len(big)}{': ' + ', '.join(big) if big else ''}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve())
