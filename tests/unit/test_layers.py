"""The package's layers and its import graph, read from the source files (nothing is imported).

Every ``import`` statement of every module under ``src/reckpt`` counts: module-level ones,
those inside functions, and those under ``if TYPE_CHECKING``. ``from reckpt.x import y`` is an
import of the module ``reckpt.x.y`` when that is a module, else of ``reckpt.x``. The lazy
export tables of the package ``__init__`` files (module paths as strings) are not imports.

Two rules: a module never imports a module of a higher layer (:data:`LAYER_ORDER`), and no two
modules import each other, directly or through others.
"""

from __future__ import annotations

import ast
import textwrap
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

PACKAGE = "reckpt"
SRC = Path(__file__).resolve().parents[2] / "src" / PACKAGE

# Bottom to top. A module may import modules of its own layer and of the layers below it,
# never of a layer above. Names are sub-packages of reckpt, except "core" and "root".
LAYER_ORDER = (
    "core",  # the top-level modules (errors, naming, policy, best, ownership, remap, dist, optim,
    #          report, _lazy, _version): pure, no I/O
    "storage",
    "testing",
    "commit",
    "format",
    "dcp",
    "dynamic",
    "sharding",
    "save",
    "delta",
    "restore",
    "tiers",
    "lifecycle",
    "root",  # reckpt/__init__.py, the public names: re-exports every layer below it
    "trainer",  # the reference trainer, built on the public names
    "cli",
)


class Import(NamedTuple):
    importer: str  # module name, e.g. "reckpt.save.engine"
    imported: str
    where: str  # "path:line" for messages


def layer_of(module: str, order: Sequence[str] = LAYER_ORDER) -> str:
    """The layer of a module, by name: ``reckpt`` itself is "root", ``reckpt.<sub>...`` is
    ``<sub>`` when that is a layer, any other ``reckpt.<name>`` is a top-level module: "core"."""
    parts = module.split(".")
    if len(parts) == 1:
        return "root"
    return parts[1] if parts[1] in order else "core"


def check(imports: Iterable[Import], order: Sequence[str] = LAYER_ORDER) -> list[str]:
    """Every violation in an import graph: imports of a higher layer, then import cycles."""
    imports = list(imports)
    rank = {layer: i for i, layer in enumerate(order)}
    problems = [
        f"upward import: {i.importer} ({layer_of(i.importer, order)}) imports {i.imported} "
        f"({layer_of(i.imported, order)}) at {i.where}"
        for i in imports
        if rank[layer_of(i.imported, order)] > rank[layer_of(i.importer, order)]
    ]
    graph: dict[str, set[str]] = defaultdict(set)
    for i in imports:
        if i.importer != i.imported:
            graph[i.importer].add(i.imported)
    problems += ["import cycle: " + " -> ".join(cycle) for cycle in _cycles(graph)]
    return problems


def _cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """One cycle (first module repeated at the end) for each strongly connected component of
    more than one module (Tarjan's algorithm)."""
    graph = defaultdict(set, edges)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)

    cycles = []
    for component in components:  # the shortest way from its first module back to it
        start = min(component)
        paths = {start: [start]}
        queue = deque([start])
        while start not in graph[queue[0]]:
            v = queue.popleft()
            for w in sorted(graph[v] & component):
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    queue.append(w)
        cycles.append([*paths[queue[0]], start])
    return sorted(cycles)


def read_imports(root: Path = SRC) -> list[Import]:
    """The imports between the modules of the package in ``root`` (a folder with ``__init__.py``)."""
    package = root.name
    files = {}
    for path in sorted(root.rglob("*.py")):
        parts = (package, *path.relative_to(root).with_suffix("").parts)
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path

    def resolve(name: str) -> str | None:  # the longest module named by a dotted prefix
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    found: dict[Import, None] = {}  # in order, each once
    for module, path in files.items():
        here = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from . import x, from ..a import b
                    anchor = here.split(".")[: len(here.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" for alias in node.names]
            for target in targets:
                if target == package or target.startswith(package + "."):
                    imported = resolve(target)
                    if imported is not None and imported != module:
                        found[Import(module, imported, f"{path}:{node.lineno}")] = None
    return list(found)


def test_no_upward_import_and_no_cycle() -> None:
    imports = read_imports()
    assert len(imports) > 100, "the reader found too few imports: is SRC right?"
    problems = check(imports)
    assert not problems, "\n".join(problems)


def test_every_sub_package_has_a_layer() -> None:
    on_disk = {p.parent.name for p in SRC.glob("*/__init__.py")}
    named = set(LAYER_ORDER) - {"core", "root"}
    assert on_disk == named, (
        f"sub-packages without a layer: {sorted(on_disk - named)}; "
        f"layers without a sub-package: {sorted(named - on_disk)}"
    )


def test_check_reports_an_upward_import_and_a_cycle() -> None:
    imports = [
        Import("reckpt.storage.core", "reckpt.errors", "a:1"),  # down: fine
        Import("reckpt.naming", "reckpt.save.engine", "b:2"),  # core -> save: up
        Import("reckpt.cli._train", "reckpt.trainer.train", "c:3"),  # down: fine
        Import("reckpt.trainer.train", "reckpt.cli", "d:4"),  # trainer -> cli: up
        Import("reckpt.format.manifest", "reckpt.format.integrity", "e:5"),  # a cycle in one layer
        Import("reckpt.format.integrity", "reckpt.format.verification", "e:6"),
        Import("reckpt.format.verification", "reckpt.format.manifest", "e:7"),
        Import("reckpt.dcp.writer", "reckpt.dcp.reader", "f:8"),  # no cycle: one way only
    ]
    assert check(imports) == [
        "upward import: reckpt.naming (core) imports reckpt.save.engine (save) at b:2",
        "upward import: reckpt.trainer.train (trainer) imports reckpt.cli (cli) at d:4",
        "import cycle: reckpt.format.integrity -> reckpt.format.verification -> "
        "reckpt.format.manifest -> reckpt.format.integrity",
    ]
    assert check(imports[:3:2] + imports[-1:]) == []


def test_read_imports_sees_every_kind_of_import(tmp_path: Path) -> None:
    files = {
        "__init__.py": """
            from typing import TYPE_CHECKING
            from reckpt._lazy import lazy_exports
            _EXPORTS = {"Thing": "reckpt.sub.b"}  # a string, not an import
            if TYPE_CHECKING:
                from reckpt.sub.b import Thing
        """,
        "_lazy.py": "import os\n",
        "errors.py": "",
        "sub/__init__.py": "from . import a\n",
        "sub/a.py": """
            import reckpt.errors
            from reckpt import errors
            def f():
                from .b import Thing
                from ..sub import b
        """,
        "sub/b.py": "from reckpt.sub.a import missing_name\nThing = 1\n",
    }
    for name, text in files.items():
        (tmp_path / "reckpt" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "reckpt" / name).write_text(textwrap.dedent(text))
    edges = {(i.importer, i.imported) for i in read_imports(tmp_path / "reckpt")}
    assert edges == {
        ("reckpt", "reckpt._lazy"),
        ("reckpt", "reckpt.sub.b"),
        ("reckpt.sub", "reckpt.sub.a"),
        ("reckpt.sub.a", "reckpt.errors"),
        ("reckpt.sub.a", "reckpt.sub.b"),
        ("reckpt.sub.b", "reckpt.sub.a"),
    }
    assert check(read_imports(tmp_path / "reckpt"), ("core", "sub", "root")) == [
        "import cycle: reckpt.sub.a -> reckpt.sub.b -> reckpt.sub.a"
    ]
