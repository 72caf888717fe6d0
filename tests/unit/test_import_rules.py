"""DESIGN's import rules, read from the source: no import circle among the package's modules
(module-level imports, the ones that run at import), no Triton outside `kernels/`, and no
import up a floor (cli/benchmarks → llm → cluster → replicas → autoscale → kernels, config,
sampling_params, outputs)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "pagedserve"
# Lower number = lower floor. A module may import its own floor or any floor below it.
FLOORS = {"cli": 5, "cli_chat": 5, "bench": 5, "__init__": 4, "llm": 4, "cluster": 3,
          "replicas": 2, "autoscale": 1, "kernels": 0, "config": 0, "sampling_params": 0,
          "outputs": 0, "metric_list": 0}


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _imports(path: Path, module: str, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    if top_level_only:  # also imports under a module-level `if`/`try` (e.g. optional triton)
        nodes = [n for top in tree.body if not isinstance(top, ast.FunctionDef | ast.ClassDef
                                                          | ast.AsyncFunctionDef)
                 for n in ast.walk(top)]
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.rsplit(".", node.level)[0]
                names.add(f"{base}.{node.module}" if node.module else base)
            elif node.module:
                names.add(node.module)
                names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _graph() -> dict[str, set[str]]:
    """Module → the package modules it imports at import time. An import of a module's own
    ancestor package is left out: Python has initialised it before the module runs."""
    modules = _modules()
    return {name: {imp for imp in _imports(path, name, True)
                   if imp in modules and imp != name and not name.startswith(imp + ".")}
            for name, path in modules.items()}


def _floor(module: str) -> int:
    part = module.split(".")[1] if "." in module else "__init__"
    return FLOORS[part]


def test_no_import_circle():
    graph, done, path, cycles = _graph(), set(), [], []

    def visit(node: str) -> None:
        if node in path:
            cycles.append(path[path.index(node):] + [node])
            return
        if node in done:
            return
        path.append(node)
        for nxt in sorted(graph[node]):
            visit(nxt)
        path.pop()
        done.add(node)

    for node in sorted(graph):
        visit(node)
    assert cycles == [], [' -> '.join(c) for c in cycles[:3]]


def test_triton_is_imported_only_in_kernels():
    outside = sorted(name for name, path in _modules().items()
                     if not name.startswith("pagedserve.kernels")
                     and any(i == "triton" or i.startswith("triton.")
                             for i in _imports(path, name, False)))
    assert outside == []


def test_no_import_runs_up_a_floor():
    upward = []
    for name, imports in _graph().items():
        for imported in imports:
            if imported != "pagedserve" and _floor(imported) > _floor(name):
                upward.append((name, imported))
    assert upward == []
