"""Training: fit, the bundled models, schedules, regularization, callbacks, checkpoints.

Imports the optimizer core and the array layer, never the tools or the command line.
"""

from . import models, regularization, schedules
from .callbacks import Callback, EarlyStopping
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .fit import History, fit

__all__ = ["fit", "History", "Callback", "EarlyStopping", "save_checkpoint", "load_checkpoint",
           "CheckpointError", "models", "schedules", "regularization"]
