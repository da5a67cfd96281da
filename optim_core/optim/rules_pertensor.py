"""The updates of the optimizers with per-tensor reductions (issue 13), each defined once.

Same language and conventions as :mod:`optim_core.optim.rules`, plus the per-tensor
reductions ``norm`` and ``sum`` (see :mod:`optim_core.optim.language`): a trust ratio
from the norms of the parameter and its update. Operation order follows the reference
each rule names (optax for LAMB and LARS), so float64 trajectories agree with it to
rounding. Kept apart from :mod:`.rules` so each group of optimizers is one module to read.
"""

from __future__ import annotations

from .language import update_rule

# The names below are bound per backend by UpdateRule.bind; these placeholders only
# make the module importable and let linters see the names.
sqrt = where = norm = size = maximum = lerp = row_mean = col_mean = None


@update_rule()
def lamb(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, eps_root, weight_decay,
         maximize, bias_correction1, bias_correction2):
    # optax.lamb: scale_by_adam, add_decayed_weights, scale_by_trust_ratio, scale by -lr.
    if maximize:
        grad = -grad
    exp_avg = (1 - beta1) * grad + beta1 * exp_avg
    exp_avg_sq = (1 - beta2) * (grad * grad) + beta2 * exp_avg_sq
    update = (exp_avg / bias_correction1) / (sqrt(exp_avg_sq / bias_correction2 + eps_root)
                                             + eps)
    if weight_decay != 0:
        update = update + weight_decay * param
    param_norm = norm(param)
    update_norm = norm(update)
    # 1 where either norm is 0 (the denominator made safe first: no 0/0 computed).
    ratio = param_norm / where(update_norm == 0, 1.0, update_norm)
    trust_ratio = where(param_norm == 0, 1.0, where(update_norm == 0, 1.0, ratio))
    param = param - lr * (update * trust_ratio)
    return param, exp_avg, exp_avg_sq


@update_rule()
def lars(param, grad, trace, *, lr, momentum, nesterov, weight_decay, trust_coefficient, eps,
         trust_ratio, maximize):
    # optax.lars: add_decayed_weights, scale_by_trust_ratio (masked), scale by -lr, trace.
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    if trust_ratio:
        param_norm = norm(param)
        grad_norm = norm(grad)
        ratio = trust_coefficient * param_norm / where(grad_norm == 0, 1.0, grad_norm + eps)
        grad = grad * where(param_norm == 0, 1.0, where(grad_norm == 0, 1.0, ratio))
    update = -lr * grad
    trace = update + momentum * trace
    if nesterov:
        update = update + momentum * trace
    else:
        update = trace
    param = param + update
    return param, trace


@update_rule(optional_states=("row_var", "col_var", "variance"),
             state_shapes={"row_var": "rows", "col_var": "cols", "variance": "unfactored"})
def adafactor(param, grad, row_var, col_var, variance, *, lr, weight_decay, maximize, eps1,
              eps2, d, one_minus_beta2_t, rho, factored):
    # torch.optim._adafactor._single_tensor_adafactor, operation for operation; the norms
    # stay on the device (torch reads them back with .item()).
    if maximize:
        grad = -grad
    # RMS of the parameter before the decay; 0 for an empty tensor (torch divides by 0).
    alpha = maximum(eps2, norm(param) / sqrt(maximum(size(param), 1.0))) * rho
    if weight_decay != 0:
        param = param * (1 - lr * weight_decay)
    if factored:
        # The last two axes factored: a row and a column mean of grad**2, their outer
        # product over the row factor's mean (Shazeer & Stern 2018, Algorithm 4).
        row_var = lerp(row_var, row_mean(grad * grad), one_minus_beta2_t)
        col_var = lerp(col_var, col_mean(grad * grad), one_minus_beta2_t)
        var_estimate = row_var * col_var / maximum(col_mean(row_var), eps1)
    else:
        variance = lerp(variance, grad * grad, one_minus_beta2_t)
        var_estimate = variance
    # eps1 squared under the square root keeps eps1's magnitude.
    update = grad / sqrt(maximum(var_estimate, eps1 * eps1))
    denom = maximum(1.0, norm(update) / (sqrt(maximum(size(update), 1.0)) * d))
    param = param - (alpha / denom) * update
    return param, row_var, col_var, variance


#: The rules of this module, in definition order.
PERTENSOR_RULES = (lamb, lars, adafactor)
