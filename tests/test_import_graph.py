"""The package's import graph has no cycle, counting the imports inside functions too.

A function-level import is a common way to dodge an import cycle at load time; the tangle stays. The graph here
has an edge for every ``import`` and ``from ... import`` of the package, wherever it sits in a module (the
module's top, a function, a class, an ``if TYPE_CHECKING:`` block), with relative imports resolved and
``from package import module`` counted as an import of that module.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "airflow_provider_stopchurn"
ROOT = PACKAGE.name


def _module(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join((ROOT, *parts))


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def _known(name: str) -> str | None:
    """The package's module ``name`` names, or the nearest enclosing one that exists (``a.b.func`` -> ``a.b``)."""
    while name:
        if name in MODULES:
            return name
        name = name.rpartition(".")[0]
    return None


def _imports(module: str) -> set[str]:
    """The package's modules that ``module`` imports, anywhere in its body."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # ``from package import module`` imports that module; ``from module import name`` the module itself
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        else:
            continue
        for target in targets:
            known = _known(target)
            if known is not None and known != module:
                found.add(known)
    return found


def _graph() -> dict[str, set[str]]:
    return {module: _imports(module) for module in MODULES}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules, the first repeated at the end), or None; iterative DFS."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph[nxt])))
    return None


def _all_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """A cycle through each strongly connected part of ``graph`` (edges of a found cycle removed in turn)."""
    graph = {module: set(targets) for module, targets in graph.items()}
    cycles = []
    while (cycle := _cycle(graph)) is not None and len(cycles) < 50:
        cycles.append(cycle)
        graph[cycle[-2]].discard(cycle[-1])
    return cycles


def test_the_graph_sees_relative_function_level_and_package_imports() -> None:
    graph = _graph()
    assert f"{ROOT}.exceptions" in graph[f"{ROOT}.update.sync"]  # a plain top-level import
    assert f"{ROOT}.operators.lineage" in graph[f"{ROOT}.operators.update"]  # ``from package import module``
    assert f"{ROOT}.sandbox.server" in graph[f"{ROOT}.sandbox"]  # a relative or package-level import
    assert f"{ROOT}.warehouse.sql" in graph[f"{ROOT}.warehouse.databases"]  # inside a function
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_the_package_has_no_import_cycle() -> None:
    cycles = _all_cycles(_graph())
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
