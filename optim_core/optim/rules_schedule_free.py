"""The elementwise rules of Schedule-Free SGD and AdamW, each defined once.

The optimizers are in :mod:`optim_core.optim.schedule_free`; the language is
:mod:`optim_core.optim.language`. The order of operations is that of ``schedulefree``
1.4.1's single-tensor steps (torch's ``add_`` with ``alpha`` is ``x + alpha * y``,
``lerp_`` the two-sided lerp), so float64 trajectories agree with it to rounding. The
host scalars (``scheduled_lr``, ``ckp1``, ``y_step``, ``bias_correction2``) come from
:meth:`optim_core.optim.schedule_free.ScheduleFreeOptimizer.scalars`.
"""

from __future__ import annotations

from .language import update_rule

# Bound per backend by UpdateRule.bind; placeholders for linters.
sqrt = lerp = None


@update_rule()
def schedule_free_sgd(param, grad, z, *, scheduled_lr, weight_decay, ckp1, y_step, first_step):
    # The order of operations is schedulefree's SGDScheduleFree.step (torch's add_ with
    # alpha is x + alpha * y, lerp_ is the two-sided lerp), so float64 agrees to rounding.
    if first_step:
        z = param  # z starts as a copy of the parameter
    if weight_decay != 0:
        grad = grad + weight_decay * param  # at y
    param = lerp(param, z, ckp1)
    param = param + y_step * grad
    z = z - scheduled_lr * grad
    return param, z


@update_rule()
def schedule_free_adamw(param, grad, z, exp_avg_sq, *, scheduled_lr, beta2, eps, weight_decay,
                        bias_correction2, ckp1, y_step, first_step):
    # schedulefree's AdamWScheduleFree.step, operation for operation.
    if first_step:
        z = param
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    denom = sqrt(exp_avg_sq / bias_correction2) + eps
    grad = grad / denom
    if weight_decay != 0:
        grad = grad + weight_decay * param  # at y, after the normalization
    param = lerp(param, z, ckp1)
    param = param + y_step * grad
    z = z - scheduled_lr * grad
    return param, z, exp_avg_sq


@update_rule()
def schedule_free_switch(param, grad, z, *, weight):
    # eval(): y -> x with weight 1 - 1/beta; train(): x -> y with weight 1 - beta. The
    # gradient is not read (the optimizer passes the parameter in its place).
    param = lerp(param, z, weight)
    return param, z
