"""The toolkit's optional dependencies: imported when a function needs one, named when missing.

``pip install optim-core`` installs the optimizers (NumPy, array-api-compat, numba,
threadpoolctl).
The training toolkit's extras come with ``pip install "optim-core[train]"``:

* tqdm: progress bars (:func:`~optim_core.fit` with ``progress=True``, the tools);
* scikit-learn: the bundled digits and diabetes data, train/test splits and k-folds
  (:mod:`optim_core.tools.datasets`, :func:`~optim_core.tools.tune`);
* matplotlib: the PNG plots of the tools and the command line.

A function that needs one of them and does not find it raises
:class:`MissingExtraError` (an ImportError) saying what to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

__all__ = ["TRAIN_EXTRA", "MissingExtraError", "require", "progress_bar"]

#: The command that installs the training toolkit's optional dependencies.
TRAIN_EXTRA = "pip install 'optim-core[train]'"

# Import name -> distribution name, for the message.
_DISTRIBUTIONS = {"tqdm": "tqdm", "sklearn": "scikit-learn", "matplotlib": "matplotlib"}


class MissingExtraError(ImportError):
    """An optional dependency of the training toolkit is not installed."""


def require(module: str, needed_for: str) -> ModuleType:
    """Import ``module`` (e.g. ``"sklearn.model_selection"``), or say which extra installs it.

    Raises
    ------
    MissingExtraError
        Naming the package, what needs it, and :data:`TRAIN_EXTRA`.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        top = module.partition(".")[0]
        package = _DISTRIBUTIONS.get(top, top)
        raise MissingExtraError(f"{needed_for} needs {package}, which is not installed; "
                                f"install the training extras: {TRAIN_EXTRA}") from exc


def progress_bar(total: int, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar over ``total`` items (on stderr), or None when ``enabled`` is False."""
    if not enabled:
        return None
    tqdm = require("tqdm.auto", "a progress bar (progress=True)").tqdm
    return tqdm(total=total, desc=desc, unit=unit)
