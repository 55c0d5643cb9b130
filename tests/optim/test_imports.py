"""Imports inside ``decoupled.optim`` point one way: no module imports one that (directly or
through others) imports it back, at module level or inside a function. A package's
``__init__`` is left out: Python runs it before any of its submodules, whoever imports them."""

from __future__ import annotations

import ast
from pathlib import Path

import decoupled.optim

PACKAGE = "decoupled.optim"
FOLDER = Path(decoupled.optim.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """The ``decoupled.optim`` submodules that the file imports, anywhere in it."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name.startswith(f"{PACKAGE}.") and name in MODULES}


MODULES = {f"{PACKAGE}.{path.stem}": path for path in FOLDER.glob("*.py")}
MODULES.pop(f"{PACKAGE}.__init__")


def test_no_module_of_optim_imports_one_that_imports_it():
    graph = {name: imported_modules(path) for name, path in MODULES.items()}

    def reachable(start: str) -> set[str]:
        seen, todo = set(), list(graph[start])
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.add(name)
                todo.extend(graph[name])
        return seen

    cycles = sorted(name for name in graph if name in reachable(name))
    assert not cycles, f"modules on an import cycle: {cycles}"
    assert graph[f"{PACKAGE}._kernels"] >= {f"{PACKAGE}._build", f"{PACKAGE}._layout"}
