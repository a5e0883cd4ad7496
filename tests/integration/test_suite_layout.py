"""The suite's own layout (tests/README.md): no test module imports another, and the modules
under tests/ import each other without a cycle. Shared code lives in tests/helpers."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import REPO


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((REPO / "tests").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    """Module -> the modules under tests/ it imports (``from tests.x import y`` counts ``tests.x.y``
    where that is a module)."""
    modules = _modules()
    graph = {}
    for name, path in modules.items():
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
                names.update(f"{node.module}.{a.name}" for a in node.names)
        graph[name] = {n for n in names if n in modules and n != name}
    return graph


def _is_test(module: str) -> bool:
    return module.rsplit(".", 1)[-1].startswith("test_")


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep, path)):
                return found
        path.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node, [])):
            return found
    return None


def test_no_test_module_imports_another() -> None:
    graph = _graph()
    assert "tests.helpers" in graph and len(graph) > 50, sorted(graph)  # the walk found the suite
    bad = [f"{a} imports {b}" for a in sorted(graph) if _is_test(a) for b in sorted(graph[a]) if _is_test(b)]
    assert not bad, "move what they share into tests/helpers: " + "; ".join(bad)


def test_no_import_cycle_among_test_modules() -> None:
    cycle = _cycle(_graph())
    assert cycle is None, " -> ".join(cycle or [])
