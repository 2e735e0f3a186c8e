"""The package's shape stays livable: no import cycle (counting imports behind TYPE_CHECKING and inside
functions), and no module over MAX_LINES."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "embedded_worker"
MAX_LINES = 400


def module_name(path: Path, root: Path = PACKAGE.parent) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str], root: Path = PACKAGE.parent, at_import_time: bool = False) -> set[str]:
    """Every module of the package that `path` imports, wherever the import statement is; `at_import_time`:
    only those it imports when it is imported (module-level, not behind TYPE_CHECKING or inside functions)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    found = set()
    for node in (tree.body if at_import_time else ast.walk(tree)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            for alias in node.names:  # `from . import x` may name a module
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in modules else target)
    return {module for module in found if module in modules and module != name}


def graph() -> dict[str, set[str]]:
    paths = list(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imports_of(path, modules) for path in paths}


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle a depth-first walk meets, as the modules along it."""
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    return cycles


def test_the_import_graph_has_no_cycle():
    edges = {module: targets - {"embedded_worker"} for module, targets in graph().items()}  # re-exports aside
    assert find_cycles(edges) == []


def test_the_check_finds_a_cycle_hidden_behind_type_checking(tmp_path):
    """The check itself can fail: two modules that import each other, one of them only for type hints."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n")
    (package / "b.py").write_text("def f():\n    from .a import A\n")
    modules = {"pkg.a", "pkg.b"}
    edges = {f"pkg.{n}": imports_of(package / f"{n}.py", modules, root=tmp_path) for n in ("a", "b")}
    assert find_cycles(edges) == [["pkg.a", "pkg.b", "pkg.a"]]


def test_no_module_is_over_the_line_limit():
    lengths = {module_name(path): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert {module: n for module, n in lengths.items() if n > MAX_LINES} == {}


MAX_IMPORT_CHAIN = 13


def longest_chain(edges: dict[str, set[str]]) -> list[str]:
    """The longest path of imports (the graph has no cycle): how many modules deep one import reaches."""
    longest: dict[str, list[str]] = {}

    def chain(module: str) -> list[str]:
        if module not in longest:
            longest[module] = [module] + max((chain(t) for t in edges.get(module, ())), key=len, default=[])
        return longest[module]

    return max((chain(module) for module in edges), key=len)


def test_the_longest_import_chain_stays_short():
    """Small modules importing a neighbour for one type made chains 23 modules deep; type-only imports sit
    behind TYPE_CHECKING (the cycle check above still counts them)."""
    paths = list(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    edges = {module_name(p): imports_of(p, modules, at_import_time=True) - {"embedded_worker"} for p in paths}
    chain = longest_chain(edges)
    assert len(chain) <= MAX_IMPORT_CHAIN, " -> ".join(chain)
