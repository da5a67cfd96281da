"""The elementwise updates of the newer optimizers (issue 13), each defined once.

Same language and conventions as :mod:`optim_core.optim.rules`: operation order
follows the reference implementation each rule names, so float64 trajectories agree
with it to rounding; host scalars come from each optimizer's ``scalars`` method.
Kept apart from :mod:`.rules` so each group of optimizers is one module to read.
"""

from __future__ import annotations

from .language import update_rule


@update_rule()
def asgd(param, grad, ax, *, eta, lambd, weight_decay, maximize, mu):
    # torch.optim's single-tensor ASGD: decay, step, then average (a copy while mu == 1).
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    param = param * (1 - lambd * eta)
    param = param - eta * grad
    if mu != 1:
        ax = ax + (param - ax) * mu
    else:
        ax = param
    return param, ax


#: The rules of this module, in definition order.
ELEMENTWISE_RULES = (asgd,)
