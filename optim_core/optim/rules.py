"""The elementwise update of every optimizer, each defined once.

The language is described in :mod:`optim_core.optim.language`. Operation order follows
torch.optim's single-tensor implementations (``addcmul``/``addcdiv`` evaluate
``value * a * b`` and ``value * a / b`` left to right), so float64 trajectories
agree with PyTorch to rounding. Host-side scalars (bias corrections, decayed step
sizes) are computed by each optimizer's ``scalars`` method. Lines several rules share
(the sign of ``maximize``, weight decay, Adam's moments) are rule fragments, written once
here and expanded into each rule that calls them.
"""

from __future__ import annotations

from .language import rule_fragment, update_rule

# The names below are bound per backend by UpdateRule.bind; these placeholders only
# make the module importable and let linters see the names.
sqrt = abs = maximum = sign = lerp = sum = size = orthogonalize = None  # noqa: A001


# Lines several rules share, each written once (expanded into every rule calling it).
@rule_fragment
def l2_decayed(param, grad, *, weight_decay, maximize):
    """The gradient, negated to maximize, plus L2 weight decay (torch.optim's order)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        grad = grad + weight_decay * param
    return grad


@rule_fragment
def decayed(param, grad, *, lr, weight_decay, decoupled_weight_decay, maximize):
    """:func:`l2_decayed`, or with ``decoupled_weight_decay`` the parameter shrunk by
    ``lr * weight_decay`` instead (AdamW; Loshchilov & Hutter 2019)."""
    if maximize:
        grad = -grad
    if weight_decay != 0:
        if decoupled_weight_decay:
            param = param * (1 - lr * weight_decay)
        else:
            grad = grad + weight_decay * param
    return param, grad


@rule_fragment
def adam_moments(grad, exp_avg, exp_avg_sq, *, beta1, beta2):
    """Adam's moving averages of the gradient and its square (Kingma & Ba 2015), as
    torch.optim writes them: ``exp_avg.lerp_(grad, 1 - beta1)``,
    ``exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)``."""
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
    return exp_avg, exp_avg_sq


@update_rule(optional_states=("momentum_buffer",))
def sgd(param, grad, momentum_buffer, *, lr, momentum, dampening, weight_decay, nesterov,
        maximize, first_step, cautious):
    grad = l2_decayed(param, grad, weight_decay=weight_decay, maximize=maximize)
    if momentum != 0:
        if first_step:
            momentum_buffer = grad
        else:
            momentum_buffer = momentum * momentum_buffer + (1 - dampening) * grad
        if nesterov:
            update = grad + momentum * momentum_buffer
        else:
            update = momentum_buffer
        if cautious:
            # Liang et al. 2024: only where the update agrees with the gradient, rescaled.
            mask = maximum(sign(update * grad), 0.0)  # 1 where they agree, else 0
            update = update * (mask * (size(mask) / (sum(mask) + 1)))
        grad = update
    param = param - lr * grad
    return param, momentum_buffer


@update_rule()
def dgd(param, grad, velocity, *, alpha):
    velocity = velocity + grad
    param = param - alpha * velocity
    return param, velocity


@update_rule()
def adagrad(param, grad, sum, *, clr, eps, weight_decay, maximize):
    grad = l2_decayed(param, grad, weight_decay=weight_decay, maximize=maximize)
    sum = sum + grad * grad
    param = param - clr * grad / (sqrt(sum) + eps)
    return param, sum


@update_rule(optional_states=("grad_avg", "momentum_buffer"))
def rmsprop(param, grad, square_avg, grad_avg, momentum_buffer, *, lr, alpha, eps,
            weight_decay, momentum, centered, maximize):
    grad = l2_decayed(param, grad, weight_decay=weight_decay, maximize=maximize)
    square_avg = alpha * square_avg + (1 - alpha) * grad * grad
    if centered:
        grad_avg = lerp(grad_avg, grad, 1 - alpha)
        avg = sqrt(square_avg - grad_avg * grad_avg) + eps
    else:
        avg = sqrt(square_avg) + eps
    if momentum > 0:
        momentum_buffer = momentum * momentum_buffer + grad / avg
        param = param - lr * momentum_buffer
    else:
        param = param - lr * grad / avg
    return param, square_avg, grad_avg, momentum_buffer


@update_rule()
def adadelta(param, grad, square_avg, acc_delta, *, lr, rho, eps, weight_decay, maximize):
    grad = l2_decayed(param, grad, weight_decay=weight_decay, maximize=maximize)
    square_avg = rho * square_avg + (1 - rho) * grad * grad
    std = sqrt(square_avg + eps)
    delta = sqrt(acc_delta + eps) / std * grad
    acc_delta = rho * acc_delta + (1 - rho) * delta * delta
    param = param - lr * delta
    return param, square_avg, acc_delta


@update_rule(optional_states=("max_exp_avg_sq",))
def adam(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, *, lr, beta1, beta2, eps,
         weight_decay, decoupled_weight_decay, amsgrad, maximize, step_size,
         bias_correction2_sqrt, cautious):
    param, grad = decayed(param, grad, lr=lr, weight_decay=weight_decay,
                          decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    exp_avg, exp_avg_sq = adam_moments(grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2)
    if amsgrad:
        max_exp_avg_sq = maximum(max_exp_avg_sq, exp_avg_sq)
        denom = sqrt(max_exp_avg_sq) / bias_correction2_sqrt + eps
    else:
        denom = sqrt(exp_avg_sq) / bias_correction2_sqrt + eps
    if cautious:
        # Liang et al. 2024: only where the update agrees with the gradient, rescaled.
        update = exp_avg / denom
        mask = maximum(sign(update * grad), 0.0)  # 1 where they agree, else 0
        param = param - step_size * (update * (mask * (size(mask) / (sum(mask) + 1))))
    else:
        param = param - step_size * exp_avg / denom
    return param, exp_avg, exp_avg_sq, max_exp_avg_sq


@update_rule()
def adamax(param, grad, exp_avg, exp_inf, *, beta1, beta2, eps, weight_decay, maximize, clr):
    grad = l2_decayed(param, grad, weight_decay=weight_decay, maximize=maximize)
    exp_avg = lerp(exp_avg, grad, 1 - beta1)
    exp_inf = maximum(beta2 * exp_inf, abs(grad) + eps)
    param = param - clr * exp_avg / exp_inf
    return param, exp_avg, exp_inf


@update_rule()
def nadam(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay,
          decoupled_weight_decay, maximize, bias_correction2, grad_step, exp_avg_step):
    param, grad = decayed(param, grad, lr=lr, weight_decay=weight_decay,
                          decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    exp_avg, exp_avg_sq = adam_moments(grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2)
    denom = sqrt(exp_avg_sq / bias_correction2) + eps
    param = param - grad_step * grad / denom
    param = param - exp_avg_step * exp_avg / denom
    return param, exp_avg, exp_avg_sq


@update_rule()
def radam(param, grad, exp_avg, exp_avg_sq, *, lr, beta1, beta2, eps, weight_decay,
          decoupled_weight_decay, maximize, bias_correction1, bias_correction2_sqrt,
          rectify, rect):
    param, grad = decayed(param, grad, lr=lr, weight_decay=weight_decay,
                          decoupled_weight_decay=decoupled_weight_decay, maximize=maximize)
    exp_avg, exp_avg_sq = adam_moments(grad, exp_avg, exp_avg_sq, beta1=beta1, beta2=beta2)
    corrected_exp_avg = exp_avg / bias_correction1
    if rectify:
        adaptive_lr = bias_correction2_sqrt / (sqrt(exp_avg_sq) + eps)
        param = param - corrected_exp_avg * lr * adaptive_lr * rect
    else:
        param = param - corrected_exp_avg * lr
    return param, exp_avg, exp_avg_sq


@update_rule()
def lion(param, grad, exp_avg, *, lr, beta1, beta2, weight_decay, maximize, cautious):
    if maximize:
        grad = -grad
    if weight_decay != 0:
        param = param * (1 - lr * weight_decay)
    update = sign(beta1 * exp_avg + (1 - beta1) * grad)
    if cautious:
        # Liang et al. 2024: only where the update agrees with the gradient, rescaled.
        mask = maximum(sign(update * grad), 0.0)  # 1 where they agree, else 0
        update = update * (mask * (size(mask) / (sum(mask) + 1)))
    param = param - lr * update
    exp_avg = beta2 * exp_avg + (1 - beta2) * grad
    return param, exp_avg


@update_rule(optional_states=("momentum_buffer", "exp_avg", "exp_avg_sq"))
def muon(param, grad, momentum_buffer, exp_avg, exp_avg_sq, *, lr, weight_decay, momentum,
         nesterov, ns_a, ns_b, ns_c, eps, ns_steps, ns_bfloat16, adjusted_lr, use_muon,
         beta1, beta2, adamw_eps, step_size, bias_correction2_sqrt):
    if use_muon:
        # torch.optim.Muon: buf.lerp_(grad, 1 - momentum), grad.lerp(buf, momentum),
        # Newton-Schulz, param.mul_(1 - lr * weight_decay), param.add_(O, alpha=-adjusted_lr).
        momentum_buffer = lerp(momentum_buffer, grad, 1 - momentum)
        if nesterov:
            update = lerp(grad, momentum_buffer, momentum)
        else:
            update = momentum_buffer
        update = orthogonalize(update, ns_a, ns_b, ns_c, eps, ns_steps, ns_bfloat16)
        if weight_decay != 0:
            param = param * (1 - lr * weight_decay)
        param = param - adjusted_lr * update
    else:
        # The groups Muon leaves to AdamW (use_muon=False): adam's lines with decoupled
        # weight decay, bit for bit (tests/test_muon.py compares them with AdamW).
        if weight_decay != 0:
            param = param * (1 - lr * weight_decay)
        exp_avg, exp_avg_sq = adam_moments(grad, exp_avg, exp_avg_sq, beta1=beta1,
                                           beta2=beta2)
        denom = sqrt(exp_avg_sq) / bias_correction2_sqrt + adamw_eps
        param = param - step_size * exp_avg / denom
    return param, momentum_buffer, exp_avg, exp_avg_sq


#: The elementwise rules (every fused kernel test runs each).
ALL_RULES = (sgd, dgd, adagrad, rmsprop, adadelta, adam, adamax, nadam, radam, lion)
#: The rules with matrix operations (tests/test_muon.py runs them).
MATRIX_RULES = (muon,)
