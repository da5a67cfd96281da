"""optim-core: first-order optimizers on plain arrays.

Every optimizer is written once against the Python array API standard and runs
on NumPy, CuPy, torch, array_api_strict, JAX and any other compliant library.
"""

# First: in a source checkout it maps optim_core.backends to the checkout's backends/.
from . import _source_tree  # noqa: F401, I001
from . import models, regularization, schedules
from .callbacks import EarlyStopping
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .optimizer import Optimizer
from .optimizers import (
    DGD,
    GD,
    SGD,
    Adadelta,
    Adagrad,
    Adam,
    Adamax,
    AdamW,
    Lion,
    NAdam,
    RAdam,
    RMSprop,
)
from .training import History, fit

__version__ = "0.1.0"

__all__ = [
    "Optimizer",
    "GD",
    "SGD",
    "DGD",
    "Adagrad",
    "RMSprop",
    "Adadelta",
    "Adam",
    "AdamW",
    "Adamax",
    "NAdam",
    "RAdam",
    "Lion",
    "save_checkpoint",
    "load_checkpoint",
    "CheckpointError",
    "fit",
    "History",
    "EarlyStopping",
    "models",
    "schedules",
    "regularization",
]
