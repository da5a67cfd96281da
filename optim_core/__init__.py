"""optim-core: first-order optimizers on plain arrays.

Every optimizer is written once against the Python array API standard and runs
on NumPy, CuPy, torch, array_api_strict, JAX and any other compliant library.

The package is layered, each layer importing only those before it:

* :mod:`optim_core._namespace`: array-library helpers;
* :mod:`optim_core.backends`: implementation selection, the generic path, the
  lowering of a rule and its numba and CUDA emitters;
* :mod:`optim_core.optim`: the rule language, the rules, the optimizers, and their pure
  form for ``jax.jit`` (:func:`optim_core.functional`);
* :mod:`optim_core.train`: fit, models, schedules, regularization, checkpoints,
  pruning, quantization;
* :mod:`optim_core.integrations`: scikit-learn estimators, explanations, the optax
  adapter (:func:`optim_core.as_optax`);
* :mod:`optim_core.tools`: compare, lr_find, tune, data sets, plots, the CLI.

The founding article's FAQ on model size and interpretability has its own modules:
:mod:`optim_core.pruning`, :mod:`optim_core.quantization`, :mod:`optim_core.explain` and
:mod:`optim_core.sklearn` (the last imports scikit-learn; ``import optim_core`` does not).
"""

# First: in a source checkout it maps optim_core.backends to the checkout's backends/.
from . import _source_tree  # noqa: F401, I001
import sys as _sys

from .optim import (
    Hyperparameter,
    Optimizer,
    RuleError,
    RuleFragment,
    UpdateRule,
    rule_fragment,
    update_rule,
)
from .optim.functional import functional
from .optim import algorithms as _algorithms
from .optim import algorithms_elementwise as _algorithms_elementwise
from .optim import algorithms_pertensor as _algorithms_pertensor
from .optim.algorithms import *  # noqa: F403 - every optimizer, as algorithms.__all__ lists them
from .optim.algorithms_elementwise import *  # noqa: F403 - likewise
from .optim.algorithms_pertensor import *  # noqa: F403 - likewise
from .optim.quasi_newton import LBFGS
from .optim.schedule_free import ScheduleFreeAdamW, ScheduleFreeOptimizer, ScheduleFreeSGD
from .train import (
    CheckpointError,
    EarlyStopping,
    History,
    checkpoint,
    fit,
    load_checkpoint,
    models,
    regularization,
    save_checkpoint,
    schedules,
)
from .train import dask_data as dask_support
from .train import pruning, quantization
from .integrations import explain
from .integrations.optax import as_optax
from .tools import datasets

__version__ = "0.1.0"

# The modules users import by their flat names (optim_core.models, ...) live in the
# subpackages; these names keep `from optim_core.models import MLP` working.
for _name, _module in {"models": models, "schedules": schedules,
                       "regularization": regularization, "checkpoint": checkpoint,
                       "datasets": datasets, "dask_support": dask_support,
                       "pruning": pruning, "quantization": quantization,
                       "explain": explain}.items():
    _sys.modules.setdefault(f"{__name__}.{_name}", _module)
del _name, _module

__all__ = [
    "Optimizer",
    "update_rule",
    "UpdateRule",
    "RuleError",
    "rule_fragment",
    "RuleFragment",
    "Hyperparameter",
    "functional",
    "as_optax",
    *_algorithms.__all__,
    *_algorithms_elementwise.__all__,
    *_algorithms_pertensor.__all__,
    "ScheduleFreeSGD",
    "ScheduleFreeAdamW",
    "ScheduleFreeOptimizer",
    "LBFGS",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "fit",
    "History",
    "EarlyStopping",
    "models",
    "schedules",
    "regularization",
    "pruning",
    "quantization",
    "explain",
]
