"""Every notebook in notebooks/ runs top to bottom in a fresh kernel and shows its figures.

The convention (notebooks/README.md): notebooks are committed without outputs and
executed here, so their numbers and figures are always those of the current code, and
each conclusion they state is asserted by a cell on the measured results. A notebook
added to notebooks/ is picked up by the glob.

Set ``NOTEBOOK_OUTPUT_DIR`` to keep the executed copies (with their figures).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# A safety net against a hung kernel, not a timing test: the budget is 3 minutes a notebook.
CELL_TIMEOUT_S = 600

nbformat = pytest.importorskip("nbformat")


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
