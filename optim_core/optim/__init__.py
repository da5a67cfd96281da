"""The optimizer core: the rule language, the rules, the Optimizer base and the optimizers.

Imports only the array layer (:mod:`optim_core._namespace`) and
:mod:`optim_core.backends`; nothing of training, tools or integrations. Every
optimizer class of :mod:`.algorithms`, :mod:`.algorithms_elementwise` and
:mod:`.algorithms_pertensor` (their
``__all__``) is public here and in :mod:`optim_core`, so a new optimizer is listed
once, beside its definition.
"""

from . import algorithms, algorithms_elementwise, algorithms_pertensor
from .algorithms import *  # noqa: F403 - the optimizers, as algorithms.__all__ lists them
from .algorithms_elementwise import *  # noqa: F403 - likewise
from .algorithms_pertensor import *  # noqa: F403 - likewise
from .base import Optimizer
from .language import UpdateRule, update_rule
from .param_group import ParamGroup
from .quasi_newton import LBFGS
from .schedule_free import ScheduleFreeAdamW, ScheduleFreeOptimizer, ScheduleFreeSGD

__all__ = ["Optimizer", "ParamGroup", "UpdateRule", "update_rule", *algorithms.__all__,
           *algorithms_elementwise.__all__, *algorithms_pertensor.__all__,
           "ScheduleFreeSGD", "ScheduleFreeAdamW", "ScheduleFreeOptimizer", "LBFGS"]
