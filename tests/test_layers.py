"""Package boundaries: every `of_ds` import (top-level or inside a function, parsed with `ast`, nothing imported)
goes down the layers table below, and no two modules import each other, directly or around a loop.

The same table is in docs/architecture.md ("Layers"); a new subpackage or top-level module needs a row."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "of_ds"

# unit -> layer: a unit imports only units of a lower layer (and itself); units of one layer do not import each other
LAYERS = {
    "spec": 0,
    "runtime": 1, "watchdog": 1,
    "model": 2,
    "data": 3, "convert": 3,
    "demo": 4,
    "engines": 5,
    "train": 6,
    "perf": 7,
    "preflight": 8, "generate_cli": 8, "cli": 8,
    "api": 9,
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path) -> set[str]:
    """The `of_ds` modules (or names inside them) that `path` imports, anywhere in its body."""
    module = module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:  # `from . import session` names a module; `from .base import Engine`, a name
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {t for t in found if t == "of_ds" or t.startswith("of_ds.")}


def resolve(target: str) -> str | None:
    """The module a dotted import target lives in (a name inside a module resolves to the module)."""
    while target and target not in MODULES:
        target = target.rpartition(".")[0]
    return target or None


def unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "of_ds"


GRAPH = {m: {r for t in imports_of(p) if (r := resolve(t)) and r != m} for m, p in MODULES.items()}


def test_every_unit_has_a_layer():
    units = {unit(m) for m in MODULES} - {"of_ds"}
    assert units - set(LAYERS) == set(), "add the new units to LAYERS (and to docs/architecture.md)"
    assert set(LAYERS) - units == set(), "LAYERS names units that no longer exist"


def test_the_parser_sees_relative_lazy_and_absolute_imports():
    assert "of_ds.train.resume_policy" in GRAPH["of_ds.train.plan"]  # `from . import resume_policy`
    assert "of_ds.engines" in GRAPH["of_ds.train.trainer"]  # a lazy `from ..engines import build_engine`
    assert "of_ds.convert" in GRAPH["of_ds.demo"]  # `from of_ds.convert import ...`


def upward(graph: dict[str, set[str]], module: str) -> list[str]:
    own = unit(module)
    return sorted(
        f"{module} -> {target} ({own}: layer {LAYERS[own]}, {unit(target)}: layer {LAYERS[unit(target)]})"
        for target in graph[module]
        if unit(target) != own and LAYERS[unit(target)] >= LAYERS[own]
    )


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("module", sorted(MODULES), ids=str)
def test_imports_go_down_the_layers(module):
    if unit(module) == "of_ds":
        assert GRAPH[module] <= {m for m in MODULES if unit(m) == "spec"}, "of_ds/__init__.py stays light"
        return
    bad = upward(GRAPH, module)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_import_cycles_between_modules():
    assert not cycles(GRAPH), f"modules that import each other: {cycles(GRAPH)}"


def test_an_upward_import_or_a_cycle_would_be_seen():
    """The checks on a made-up graph: engines importing train, train importing perf, a two-module loop."""
    graph = {"of_ds.engines.x": {"of_ds.train.checkpoint", "of_ds.model"}, "of_ds.train.y": {"of_ds.perf.memory"},
             "of_ds.train.a": {"of_ds.train.b"}, "of_ds.train.b": {"of_ds.train.a"}, "of_ds.runtime": {"of_ds.watchdog"}}
    assert [m.split(" ")[2] for m in upward(graph, "of_ds.engines.x")] == ["of_ds.train.checkpoint"]
    assert upward(graph, "of_ds.train.y") and upward(graph, "of_ds.runtime")  # same layer counts as upward
    assert not upward(graph, "of_ds.train.a")
    assert cycles(graph) == [["of_ds.train.a", "of_ds.train.b"]]
    assert resolve("of_ds.train.plan.resolve_plan") == "of_ds.train.plan"
