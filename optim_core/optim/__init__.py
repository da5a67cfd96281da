"""The optimizer core: the rule language, the rules, the Optimizer base and the optimizers.

Imports only the array layer (:mod:`optim_core._namespace`) and
:mod:`optim_core.backends`; nothing of training, tools or integrations. Every
optimizer class of :mod:`.algorithms`, :mod:`.algorithms_elementwise` and
:mod:`.algorithms_pertensor` (their
``__all__``) is public here and in :mod:`optim_core`, so a new optimizer is listed
once, beside its definition.

Writing your own optimizer uses only public names: :func:`update_rule` (the rule
language, :mod:`.language`), :class:`Optimizer` (what a subclass sets: its Notes),
:class:`Hyperparameter` (the check of a hyperparameter the shared table lacks) and
:class:`RuleError` (a rule outside the language).
"""

from . import algorithms, algorithms_elementwise, algorithms_pertensor
from .algorithms import *  # noqa: F403 - the optimizers, as algorithms.__all__ lists them
from .algorithms_elementwise import *  # noqa: F403 - likewise
from .algorithms_pertensor import *  # noqa: F403 - likewise
from .base import Optimizer
from .language import RuleError, RuleFragment, UpdateRule, rule_fragment, update_rule
from .param_group import Hyperparameter, ParamGroup
from .quasi_newton import LBFGS
from .schedule_free import ScheduleFreeAdamW, ScheduleFreeOptimizer, ScheduleFreeSGD

__all__ = ["Optimizer", "ParamGroup", "Hyperparameter", "UpdateRule", "RuleError",
           "update_rule", "RuleFragment", "rule_fragment", *algorithms.__all__,
           *algorithms_elementwise.__all__, *algorithms_pertensor.__all__,
           "ScheduleFreeSGD", "ScheduleFreeAdamW", "ScheduleFreeOptimizer", "LBFGS"]
