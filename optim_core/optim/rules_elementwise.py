"""The elementwise updates of the newer optimizers (issue 13), each defined once.

Same language and conventions as :mod:`optim_core.optim.rules`: operation order
follows the reference implementation each rule names, so float64 trajectories agree
with it to rounding; host scalars come from each optimizer's ``scalars`` method.
Kept apart from :mod:`.rules` so each group of optimizers is one module to read.
"""

from __future__ import annotations

from .language import update_rule
from .rules import decayed, l2_decayed

# The names below are bound per backend by UpdateRule.bind; these placeholders only
# make the module importable and let linters see the names.
sqrt = maximum = minimum = sign = where = None


@update_rule()
def asgd(param, grad, ax, *, eta, lambd, weight_decay, maximize, mu):
    # torch.optim's single-tensor ASGD: decay, step, then average (a copy while mu == 1).
    grad = l2_decayed(param, grad, weight_decay=weight_decay, maximize=maximize)
    param = param * (1 - lambd * eta)
    param = param - eta * grad
    if mu != 1:
        ax = ax + (param - ax) * mu
    else:
        ax = param
    return param, ax


@update_rule()
def rprop(param, grad, prev, step_size, *, etaminus, etaplus, step_size_min, step_size_max,
          maximize):
    # torch.optim's single-tensor Rprop: where the gradient kept its sign the step grows,
    # where it flipped the step shrinks and that element skips this step (its gradient
    # counts as 0, also for the next comparison).
    if maximize:
        grad = -grad
    direction = grad * prev
    factor = where(direction > 0, etaplus,
                   where(direction < 0, etaminus, where(direction == 0, 1, direction)))
    step_size = minimum(maximum(step_size * factor, step_size_min), step_size_max)
    grad = where(direction < 0, 0, grad)
    param = param - sign(grad) * step_size
    prev = grad
    return param, prev, step_size


@update_rule()
def adopt(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay,
          decoupled_weight_decay, maximize, initialize, use_clipping, clip, nesterov):
    # optax's scale_by_adopt (its order of operations): the first step only fills the
    # second moment; later ones normalize the gradient by the previous second moment.
    param, grad = decayed(param, grad, lr=lr, weight_decay=weight_decay,
                          decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    if initialize:
        exp_avg_sq = grad * grad
    else:
        normed = grad / maximum(sqrt(exp_avg_sq), eps)
        if use_clipping:
            normed = minimum(maximum(normed, -clip), clip)
        exp_avg = (1 - beta1) * normed + beta1 * exp_avg
        if nesterov:
            param = param - lr * ((1 - beta1) * normed + beta1 * exp_avg)
        else:
            param = param - lr * exp_avg
        exp_avg_sq = (1 - beta2) * (grad * grad) + beta2 * exp_avg_sq
    return param, exp_avg, exp_avg_sq


@update_rule()
def ademamix(param, grad, exp_avg_fast, exp_avg_slow, exp_avg_sq, *, lr, beta1, beta2, beta3,
             alpha, eps, eps_root, weight_decay, maximize, bias_correction1, bias_correction2):
    # optax.contrib.ademamix (its order of operations): Adam's moments plus a slow EMA
    # mixed in by alpha, uncorrected; decoupled weight decay scaled by lr.
    if maximize:
        grad = -grad
    exp_avg_fast = (1 - beta1) * grad + beta1 * exp_avg_fast
    exp_avg_slow = (1 - beta3) * grad + beta3 * exp_avg_slow
    exp_avg_sq = (1 - beta2) * (grad * grad) + beta2 * exp_avg_sq
    update = (exp_avg_fast / bias_correction1 + alpha * exp_avg_slow) / (
        sqrt(exp_avg_sq / bias_correction2 + eps_root) + eps)
    if weight_decay != 0:
        update = update + weight_decay * param
    param = param - lr * update
    return param, exp_avg_fast, exp_avg_slow, exp_avg_sq


#: The rules of this module, in definition order.
ELEMENTWISE_RULES = (asgd, rprop, adopt, ademamix)
