"""The package's layers, read from the source: imports flow one way and never in a cycle.

Every import counts, including those inside functions (a lazy import is still a
dependency); only imports under ``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Each layer may import itself and the layers listed for it, nothing else of the project.
_BASE = {"optim_core._namespace", "optim_core._checks"}
ALLOWED = {
    "optim_core._checks": set(),
    "optim_core._namespace": set(),
    "optim_core.backends": _BASE,
    "optim_core.optim": _BASE | {"optim_core.backends"},
    "optim_core.train": _BASE | {"optim_core.backends", "optim_core.optim"},
    "optim_core.integrations": _BASE | {"optim_core.backends", "optim_core.optim",
                                        "optim_core.train"},
    "optim_core.tools": _BASE | {"optim_core.backends", "optim_core.optim", "optim_core.train",
                                 "optim_core.integrations"},
    # The flat name of the scikit-learn estimators (a module of its own: it imports sklearn).
    "optim_core.sklearn": {"optim_core.integrations"},
    # The flat name of the torch.optim drop-ins (imports torch).
    "optim_core.torch": {"optim_core.integrations", "optim_core.optim"},
}


def _source_modules() -> dict[str, Path]:
    modules = {}
    for path in sorted((ROOT / "optim_core").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((ROOT / "backends").rglob("*.py")):
        parts = ("optim_core", *path.relative_to(ROOT).with_suffix("").parts)
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


MODULES = _source_modules()


def _is_type_checking(node: ast.If) -> bool:
    return isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"


def _imports(module: str, path: Path) -> set[str]:
    """The project modules ``module`` imports (a name imported from a package that is
    itself a module counts as that module)."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
               and _is_type_checking(node) for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in MODULES
                       else origin for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in MODULES and t != module)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _layer(module: str) -> str | None:
    for layer in sorted(ALLOWED, key=len, reverse=True):
        if module == layer or module.startswith(layer + "."):
            return layer
    return None


def test_the_walk_sees_every_layer_and_their_imports():
    # Guards the test itself: an empty graph would pass everything below.
    assert {_layer(m) for m in MODULES} >= set(ALLOWED)
    assert "optim_core.backends" in GRAPH["optim_core.optim.base"]
    assert "optim_core.optim.language" in GRAPH["optim_core.optim.rules"]


def test_no_import_cycle_among_the_modules():
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> None:
        state[module] = "open"
        path.append(module)
        for target in sorted(GRAPH[module]):
            if state.get(target) == "open":
                cycle = path[path.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[module] = "done"

    for module in sorted(GRAPH):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _layer(m) is not None))
def test_each_module_imports_only_its_own_layer_and_those_below(module):
    layer = _layer(module)
    allowed = ALLOWED[layer] | {layer}
    wrong = sorted(t for t in GRAPH[module] if _layer(t) not in allowed and _layer(t) is not None)
    assert not wrong, f"{module} ({layer}) imports {wrong}"
