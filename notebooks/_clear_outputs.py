"""Clear the outputs of notebooks before committing them (the convention of notebooks/README.md).

Usage: ``python notebooks/_clear_outputs.py notebooks/*.ipynb``. Rewrites each file with
every code cell's outputs emptied and execution counts null; other metadata is kept.
"""

from __future__ import annotations

import sys

import nbformat


def clear(path: str) -> bool:
    """Clear ``path`` in place; return whether anything changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        if cell.outputs or cell.execution_count is not None:
            changed = True
        cell.outputs = []
        cell.execution_count = None
    if changed:
        nbformat.write(notebook, path)
    return changed


if __name__ == "__main__":
    for name in sys.argv[1:]:
        print(f"{name}: {'cleared' if clear(name) else 'already clear'}")
