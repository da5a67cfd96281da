"""Running from a source checkout: ``optim_core.backends`` is the checkout's ``backends/``.

The package is laid out as ``optim_core/`` and, beside it, ``backends/``, which is
installed *inside* the package as ``optim_core.backends`` (see ``package-dir`` in
pyproject.toml). Python started in the checkout's root (``python -m optim_core``, a
notebook, ``python -c``) imports this source folder, which has no ``backends/``. The
finder below resolves ``optim_core.backends`` to the checkout's ``backends/`` in that
case only: never as a top-level ``backends`` module, and after every other finder, so an
installed or editable mapping, where present, still wins.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent
_SOURCE_BACKENDS = _PACKAGE.parent / "backends"


class _SourceBackendsFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path=None, target=None):
        if fullname != "optim_core.backends":
            return None
        return importlib.util.spec_from_file_location(
            fullname, _SOURCE_BACKENDS / "__init__.py",
            submodule_search_locations=[str(_SOURCE_BACKENDS)])


def map_source_backends() -> None:
    """Install the finder if this package is a source folder with ``backends/`` beside it."""
    if (_PACKAGE / "backends").is_dir() or not (_SOURCE_BACKENDS / "__init__.py").is_file():
        return
    if not any(isinstance(finder, _SourceBackendsFinder) for finder in sys.meta_path):
        sys.meta_path.append(_SourceBackendsFinder())


map_source_backends()
