"""The optim-core benchmark suite; run ``python -m bench`` from the repository root.

``python -m`` puts the repository root first on ``sys.path``, so ``optim_core``
is imported from the source tree, where ``backends/`` sits beside the package
rather than inside it (it is installed as ``optim_core.backends``). When that
source-tree package is the one found and the installed mapping is not there to
resolve ``optim_core.backends``, the finder below maps it, as the package's
``package-dir`` does at install time.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent


class _SourceBackendsFinder(importlib.abc.MetaPathFinder):
    """Resolves ``optim_core.backends`` to the source tree's ``backends/``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != "optim_core.backends":
            return None
        return importlib.util.spec_from_file_location(
            fullname, _ROOT / "backends" / "__init__.py",
            submodule_search_locations=[str(_ROOT / "backends")])


def _map_source_backends() -> None:
    if "optim_core" in sys.modules:
        return
    spec = importlib.util.find_spec("optim_core")
    if spec is None or spec.origin is None:
        return
    package = Path(spec.origin).resolve().parent
    if package == _ROOT / "optim_core" and not (package / "backends").is_dir() \
            and (_ROOT / "backends" / "__init__.py").is_file():
        # Last, so an editable install's own mapping, where present, still wins.
        sys.meta_path.append(_SourceBackendsFinder())


_map_source_backends()
