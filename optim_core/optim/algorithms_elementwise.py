"""The newer elementwise optimizers (issue 13): hyperparameters, host scalars and documentation.

The math lives in :mod:`optim_core.optim.rules_elementwise`. Names, defaults and
numbers follow ``torch.optim`` where torch has the optimizer, and the reference
implementation each docstring names otherwise (the mapping of names is documented
where the reference's differ).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import _checks
from . import rules_elementwise as rules
from . import scalar_math
from .algorithms import _doc
from .base import Optimizer
from .param_group import Hyperparameter

__all__ = ["ASGD"]


def _nonnegative(name: str, value: Any) -> float:
    return _checks.number(name, value, low=0)


@_doc
class ASGD(Optimizer):
    r"""Averaged stochastic gradient descent (Polyak & Juditsky, "Acceleration of
    Stochastic Approximation by Averaging", SIAM J. Control Optim. 1992).

    .. math::

        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda_{wd}\theta_{t-1} \\
        \theta_t &= \theta_{t-1}\,(1 - \lambda\eta_{t-1}) - \eta_{t-1} g_t \\
        \bar\theta_t &= \begin{cases} \theta_t & \mu_{t-1} = 1 \\
            \bar\theta_{t-1} + \mu_{t-1}(\theta_t - \bar\theta_{t-1}) & \text{otherwise}
            \end{cases} \\
        \eta_t &= \gamma / (1 + \lambda\gamma t)^{\alpha}, \qquad
        \mu_t = 1 / \max(1, t - t_0)

    with :math:`\eta_0 = \gamma` (the learning rate at the first step) and
    :math:`\mu_0 = 1`. Same as ``torch.optim.ASGD``: :math:`\eta` and :math:`\mu` are
    computed after each step from that step's learning rate and used by the next, so a
    schedule changing ``lr`` acts one step later, as in torch. They are the group
    state's ``eta`` and ``mu`` (torch keeps them per parameter, all equal); the average
    :math:`\bar\theta` is each parameter's state ``ax``
    (``opt.state[group][index]["ax"]``).

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-2
        Learning rate :math:`\gamma`.
    lambd : float, default 1e-4
        Decay term :math:`\lambda`.
    alpha : float, default 0.75
        Power :math:`\alpha` of the step-size decay.
    t0 : float, default 1e6
        Step :math:`t_0` after which averaging starts (before it, :math:`\bar\theta = \theta`).
    weight_decay : float, default 0
        L2 penalty :math:`\lambda_{wd}` added to the gradient.
    maximize : bool, default False
    {common}
    """

    cli_name = "asgd"
    weight_decay_kind = "l2"

    rule = rules.asgd
    hyperparameter_checks = {"lambd": Hyperparameter(_nonnegative),
                             "t0": Hyperparameter(_checks.number)}

    def __init__(self, params: Any, lr: float = 1e-2, lambd: float = 1e-4, alpha: float = 0.75,
                 t0: float = 1e6, weight_decay: float = 0, *, maximize: bool = False,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, lambd=lambd, alpha=alpha, t0=t0,
                                      weight_decay=weight_decay, maximize=maximize), **options)

    def _initial_group_state(self) -> dict[str, Any]:
        # eta is set by the first step (to that step's lr), before which it is unused.
        return {"step": 0, "eta": 0.0, "mu": 1.0}

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        step, lr = group_state["step"], group["lr"]
        # where and maximum, not `if` and max: the same code runs on traced steps
        # (optim_core.functional).
        eta = scalar_math.where(step == 1, lr, group_state["eta"])
        mu = group_state["mu"]
        # The next step's values, as torch computes them (Python floats).
        group_state["eta"] = lr / ((1 + group["lambd"] * lr * step) ** group["alpha"])
        group_state["mu"] = 1.0 / scalar_math.maximum(1.0, step - group["t0"])
        return {"eta": eta, "mu": mu}
