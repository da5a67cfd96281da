"""Every notebook in notebooks/ runs top to bottom in a fresh kernel and shows its figures.

The convention (notebooks/README.md): notebooks are committed without outputs and
executed here, so their numbers and figures are always those of the current code, and
each conclusion they state is asserted by a cell on the measured results. A notebook
added to notebooks/ is picked up by the glob.

Set ``NOTEBOOK_OUTPUT_DIR`` to keep the executed copies (with their figures).
"""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# A safety net against a hung kernel, not a timing test: the budget is 3 minutes a notebook.
CELL_TIMEOUT_S = 600

nbformat = pytest.importorskip("nbformat")


#: An ANSI escape sequence (colours, cursor moves).
ANSI_CODE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _read(path: Path):
    return nbformat.read(path, as_version=4)


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    notebook = _read(path)
    nbformat.validate(notebook)
    dirty = [i for i, cell in enumerate(notebook.cells) if cell.cell_type == "code"
             and (cell.outputs or cell.execution_count is not None)]
    assert not dirty, (f"{path.name}: cells {dirty} carry outputs; clear them "
                       f"(python notebooks/_clear_outputs.py {path.name})")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_shows_figures(path):
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    notebook = _read(path)
    client = nbclient.NotebookClient(notebook, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    try:
        client.execute()  # raises CellExecutionError naming the cell and the traceback
    except nbclient.exceptions.CellExecutionError as exc:
        # The kernel's traceback is coloured by IPython whatever NO_COLOR says; CI logs
        # carry no ANSI codes, so the failure is reported without them.
        raise AssertionError(f"{path.name}: {ANSI_CODE.sub('', str(exc))}") from None
    finally:
        out_dir = os.environ.get("NOTEBOOK_OUTPUT_DIR")
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            nbformat.write(notebook, Path(out_dir) / path.name)
    outputs = [out for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.outputs]
    errors = [out for out in outputs if out.output_type == "error"]
    assert not errors, f"{path.name}: {errors[0].ename}: {errors[0].evalue}"
    figures = [out for out in outputs if "image/png" in out.get("data", {})]
    assert figures, f"{path.name} shows no figure (no image/png output)"


# --------------------------------------------------------------------------- no clock asserted
#: Functions that read a clock (``time.perf_counter()``, ``timeit.default_timer()``...).
CLOCKS = {"time": {"time", "time_ns", "perf_counter", "perf_counter_ns", "monotonic",
                   "monotonic_ns", "process_time", "process_time_ns", "thread_time"},
          "timeit": {"default_timer", "timeit", "repeat"}}
#: Calls that build a container from keywords: their keys carry the values' taint.
KEYWORD_CONTAINERS = {"dict"}
MUTATORS = {"append", "extend", "add", "update", "insert", "setdefault"}
#: Calls whose result says nothing about the values measured (how many, of which type).
NEUTRAL = {"len", "isinstance", "type"}


class ClockTaint:
    """Which values of a piece of code derive from a clock: a small, flow-insensitive taint
    analysis over names, string keys (``run["seconds"]`` is tainted, ``run["steps"]`` is not)
    and functions that read a clock (and so return a measured time)."""

    def __init__(self, tree: ast.AST) -> None:
        self.names: set[str] = set()
        self.keys: set[str] = set()
        self.functions: set[str] = set()
        size = -1
        while size != len(self.names) + len(self.keys) + len(self.functions):
            size = len(self.names) + len(self.keys) + len(self.functions)
            for node in ast.walk(tree):
                self._propagate(node)

    def tainted(self, node: ast.AST | None) -> bool:
        if node is None or isinstance(node, (ast.Constant, ast.Lambda)):
            return False
        if isinstance(node, ast.Name):
            return node.id in self.names
        if isinstance(node, ast.Attribute):  # history.time: epoch durations
            if node.attr == "time" and not (isinstance(node.value, ast.Name)
                                            and node.value.id in CLOCKS):
                return True
            return self.tainted(node.value)
        if isinstance(node, ast.Subscript):
            key = node.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                return key.value in self.keys or self.tainted(node.value)
            return self.tainted(node.value) or self.tainted(key)
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) \
                    and func.attr in CLOCKS.get(func.value.id, ()):
                return True
            if isinstance(func, ast.Name) and func.id in self.functions:
                return True
            if isinstance(func, ast.Name) and func.id in NEUTRAL:
                return False
            if isinstance(func, ast.Name) and func.id in KEYWORD_CONTAINERS:
                for keyword in node.keywords:  # dict(seconds=...): a tainted key only
                    if keyword.arg and self.tainted(keyword.value):
                        self.keys.add(keyword.arg)
                return any(self.tainted(arg) for arg in node.args)
            return (self.tainted(func) or any(self.tainted(a) for a in node.args)
                    or any(self.tainted(k.value) for k in node.keywords))
        if isinstance(node, ast.Dict):
            whole = False
            for key, value in zip(node.keys, node.values):
                if self.tainted(value):
                    if isinstance(key, ast.Constant) and isinstance(key.value, str):
                        self.keys.add(key.value)
                    else:
                        whole = True
            return whole
        if isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            for generator in node.generators:
                if self.tainted(generator.iter):
                    self.names.update(_names(generator.target))
            parts = [node.key, node.value] if isinstance(node, ast.DictComp) else [node.elt]
            return any(self.tainted(part) for part in parts)
        return any(self.tainted(child) for child in ast.iter_child_nodes(node))

    def _propagate(self, node: ast.AST) -> None:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = ast.Module(body=node.body, type_ignores=[])
            if any(self.tainted(n) for n in ast.walk(body) if isinstance(n, ast.Call)) or any(
                    isinstance(n, ast.Return) and self.tainted(n.value) for n in ast.walk(body)):
                self.functions.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            if self.tainted(node.value):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    self._taint_target(target)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            if self.tainted(node.iter):
                self.names.update(_names(node.target))
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in MUTATORS and any(self.tainted(a) for a in node.args):
            self._taint_target(node.func.value)

    def _taint_target(self, target: ast.AST) -> None:
        if isinstance(target, ast.Subscript):
            key = target.slice
            if isinstance(key, ast.Constant) and isinstance(key.value, str):
                self.keys.add(key.value)
            else:
                self._taint_target(target.value)
        elif isinstance(target, ast.Attribute):
            self._taint_target(target.value)
        else:
            self.names.update(_names(target))


def _names(target: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}


def clock_assertions(source: str) -> list[str]:
    """The assertions in ``source`` whose outcome depends on a clock reading."""
    tree = ast.parse(source)
    taint = ClockTaint(tree)
    found = []
    for node in ast.walk(tree):
        checked = None
        if isinstance(node, ast.Assert):
            checked = node.test
        elif isinstance(node, ast.Call) and "assert" in ast.unparse(node.func):
            checked = node
        if checked is not None and taint.tainted(checked):
            found.append(f"line {node.lineno}: {ast.unparse(node)[:120]}")
    return found


def _notebook_source(path: Path) -> str:
    cells = [cell.source for cell in _read(path).cells if cell.cell_type == "code"]
    # IPython magics and shell escapes are not Python.
    return "\n".join("\n".join(line for line in cell.splitlines()
                               if not line.lstrip().startswith(("%", "!")))
                     for cell in cells)


TEST_FILES = sorted(Path(__file__).resolve().parent.glob("*.py"))


@pytest.mark.parametrize("path", NOTEBOOKS + TEST_FILES,
                         ids=[p.stem for p in NOTEBOOKS] + [p.name for p in TEST_FILES])
def test_nothing_asserts_a_wall_clock_time_or_a_speed_ratio(path):
    """Speed is reported (printed, plotted, bench/), never pass/fail: a loaded CI machine
    must not fail a run. Asserted conclusions about counts, losses and memory stay."""
    source = _notebook_source(path) if path.suffix == ".ipynb" else path.read_text()
    assert not clock_assertions(source), f"{path.name} asserts on a measured time"


@pytest.mark.parametrize("code, clocked", [
    ("import time\nt = time.perf_counter()\nassert t > 0", True),
    ("import time\ndef timed(f):\n    s = time.perf_counter()\n    f()\n"
     "    return time.perf_counter() - s\nr = {n: timed(print) for n in (1, 2)}\n"
     "speedup = r[1] / r[2]\nassert speedup > 2", True),
    ("runs = []\nfor h in hs:\n    runs.append(dict(steps=h.steps, seconds=sum(h.time)))\n"
     "steps = [r['steps'] for r in runs]\nseconds = [r['seconds'] for r in runs]\n"
     "assert steps[0] > steps[1]", False),
    ("runs = []\nfor h in hs:\n    runs.append(dict(steps=h.steps, seconds=sum(h.time)))\n"
     "seconds = [r['seconds'] for r in runs]\nassert min(seconds) < 1", True),
    ("t = {}\nt[1, 2] = h.time[-1]\nassert t[1, 2] > 0", True),
    ("assert len(history.time) == 3", False),
    ("import numpy as np\nnp.testing.assert_allclose(a, b)\nassert loss < 1", False),
])
def test_the_clock_check_finds_timing_assertions(code, clocked):
    assert bool(clock_assertions(code)) == clocked
