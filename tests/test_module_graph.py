"""The core's imports form a tree: no module reaches back to one that imports it.

Counted with the imports made only for type checking, since a cycle there is
still a cycle in the design (schema needing routing, say). ``flux_proxy.sdk`` is a
leaf by contract: it re-exports and no core module imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import flux_proxy

PACKAGE = Path(flux_proxy.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The flux_proxy modules ``path`` imports (a package's submodule counts as itself)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name in known}


def graph() -> dict[str, set[str]]:
    files = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    known = set(files)
    edges = {name: imports_of(path, known) - {name} for name, path in files.items()}
    # A package's __init__ that re-exports its submodules is not a dependency of
    # them: importing flux_proxy.x runs flux_proxy/__init__ first anyway.
    for name in edges:
        edges[name] = {dep for dep in edges[name] if not name.startswith(dep + ".")}
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(edges[node]):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            if dep not in state and (cycle := visit(dep)) is not None:
                return cycle
        state[node] = "done"
        path.pop()
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_the_core_import_graph_has_no_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle or [])


def test_no_core_module_imports_the_sdk() -> None:
    importers = [name for name, deps in graph().items() if "flux_proxy.sdk" in deps]
    assert importers == [], importers


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
