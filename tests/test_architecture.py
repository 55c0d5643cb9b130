"""The package's layers point one way: optim → diagnostics → lab → cli (docs/ARCHITECTURE.md).

Every ``import`` in ``src/decoupled`` is read from the source, including imports inside
functions: a lazy import of a higher layer is still a dependency on it. A module may import its
own layer or a lower one, never a higher one, and the imports between modules form no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import decoupled

PACKAGE_ROOT = Path(decoupled.__file__).parent

# The layer of each top-level part of the package; a lower number is a lower layer.
LAYERS = {
    "decoupled": 0,  # the package's public API re-exports the optimizers and rules only
    "decoupled.optim": 0,
    "decoupled.schedules": 0,
    "decoupled.rules": 0,
    "decoupled.plotting": 1,  # the one pyplot entry point, shared by diagnostics and lab
    "decoupled.diagnostics": 1,
    "decoupled.lab": 2,
    "decoupled.integrations": 2,  # trainer callbacks, TensorBoard: beside the lab
    "decoupled.bench": 2,
    "decoupled.bench_device": 2,  # the Triton path against torch on a GPU (bench --device cuda)
    "decoupled.cli": 3,
    "decoupled.__main__": 3,
}


def layer_of(module: str) -> int:
    """The layer of the longest prefix of ``module`` named in LAYERS."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        if prefix in LAYERS:
            return LAYERS[prefix]
    raise KeyError(f"{module} belongs to no layer: add it to LAYERS")


def module_name(path: Path, root: Path = PACKAGE_ROOT) -> str:
    relative = path.relative_to(root.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, is_package: bool) -> set[str]:
    """Every ``decoupled...`` module that ``source`` imports, at any nesting depth. For
    ``from X import name`` the result is ``X.name`` when that is a module of ours, else ``X``."""
    found = set()
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
    return {name for name in found if name == "decoupled" or name.startswith("decoupled.")}


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    """Module → the package's modules it imports (names that are not modules are dropped)."""
    sources = {module_name(p, root): p for p in root.rglob("*.py")}
    graph = {}
    for module, path in sources.items():
        names = imported_modules(path.read_text(), module, path.name == "__init__.py")
        graph[module] = {n for n in names if n in sources and n != module}
    return graph


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{module} (layer {layer_of(module)}) imports {target} (layer {layer_of(target)})"
        for module, targets in graph.items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules, or None. A package's ``__init__`` importing
    its own submodules is not a cycle by itself, so edges into a package from its own
    submodules are ignored."""
    visiting, done = set(), set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        visiting.add(node)
        for target in sorted(graph.get(node, ())):
            if node.startswith(target + "."):
                continue  # a submodule importing its own package (re-exports)
            if target in visiting:
                return path[path.index(target) :] + [target]
            if target not in done:
                cycle = visit(target, path + [target])
                if cycle:
                    return cycle
        visiting.discard(node)
        done.add(node)
        return None

    for start in sorted(graph):
        if start not in done:
            cycle = visit(start, [start])
            if cycle:
                return cycle
    return None


def test_no_layer_imports_a_higher_one():
    assert upward_imports(import_graph()) == []


def test_modules_import_no_cycle():
    assert find_cycle(import_graph()) is None


def test_every_module_has_a_layer():
    for module in import_graph():
        layer_of(module)


# The checks above must be able to fail: run them on a small package written here.
@pytest.fixture
def toy_package(tmp_path: Path) -> Path:
    root = tmp_path / "decoupled"
    for folder in ("optim", "diagnostics", "lab", "cli"):
        (root / folder).mkdir(parents=True)
        (root / folder / "__init__.py").write_text("")
    (root / "__init__.py").write_text("from decoupled.optim import a\n")
    (root / "optim" / "a.py").write_text("from . import b\n")
    (root / "optim" / "b.py").write_text(
        "def late():\n    from decoupled.optim.a import x\n    import decoupled.lab.run\n"
    )
    (root / "lab" / "run.py").write_text("from decoupled.diagnostics import __init__\n")
    (root / "cli" / "main.py").write_text("from ..lab.run import go\n")
    return root


def test_checker_finds_a_lazy_upward_import_and_a_cycle(toy_package: Path):
    graph = import_graph(toy_package)
    assert graph["decoupled.cli.main"] == {"decoupled.lab.run"}  # relative import resolved
    assert upward_imports(graph) == [
        "decoupled.optim.b (layer 0) imports decoupled.lab.run (layer 2)"
    ]
    assert find_cycle(graph) == ["decoupled.optim.a", "decoupled.optim.b", "decoupled.optim.a"]


def test_importing_the_command_line_does_not_import_dynamo():
    """``torch._dynamo`` takes about 2 s to import: the functions kept out of torch.compile
    are decorated lazily (``_compact.eager``), so that ``decoupled --help`` or a refused
    argument does not wait for it. A step still imports it, and under torch.compile the
    decorated functions still run eagerly (tests/integration/test_compile.py)."""
    import subprocess
    import sys

    probe = (
        "import sys, decoupled.cli; "
        "print(sorted(m for m in sys.modules if m.startswith('torch._dynamo')))"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.strip() == "[]", result.stderr
