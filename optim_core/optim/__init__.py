"""The optimizer core: the rule language, the rules, the Optimizer base and the optimizers.

Imports only the array layer (:mod:`optim_core._namespace`) and
:mod:`optim_core.backends`; nothing of training, tools or integrations.
"""

from .algorithms import (
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
from .base import Optimizer
from .language import UpdateRule, update_rule

__all__ = ["Optimizer", "UpdateRule", "update_rule", "GD", "SGD", "DGD", "Adagrad", "RMSprop",
           "Adadelta", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "Lion"]
