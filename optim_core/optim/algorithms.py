"""The optimizers: hyperparameters, host scalars and documentation around each rule.

The elementwise math lives in :mod:`optim_core.rules`; a class here only names its
rule, its defaults, and the scalars computed once per step on the host (in
float64, with an exact integer step count). Names, defaults and numbers follow
``torch.optim``'s documented algorithms.

Where the founding article's code departs from the algorithm it names, the
canonical algorithm ships under the name and the docstring says how the article
differs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .. import _checks
from . import rules, scalar_math
from .base import Optimizer
from .param_group import Hyperparameter

__all__ = ["GD", "SGD", "DGD", "Adagrad", "RMSprop", "Adadelta", "Adam", "AdamW", "Adamax",
           "NAdam", "RAdam", "Lion", "Muon"]

_COMMON = """
    impl : {"auto", "fused", "generic"}, optional
        Implementation; "auto" takes a fused kernel where one exists.
    backend : "auto", "numpy", "cupy" or module, optional
        Must agree with the parameters' library.
    nonfinite : {"propagate", "skip", "raise"}, optional
        Policy for NaN/inf gradients (see :class:`~optim_core.Optimizer`)."""


def _doc(cls: type) -> type:
    cls.__doc__ = cls.__doc__.replace("    {common}", _COMMON.strip("\n")).replace(
        "{cautious}", _CAUTIOUS_DOC)
    return cls


#: The ``cautious`` option's check, for the optimizers that have it.
_CAUTIOUS = {"cautious": Hyperparameter(_checks.boolean)}

_CAUTIOUS_DOC = """cautious : bool, default False
        Cautious update (Liang et al., "Cautious Optimizers: Improving Training with One
        Line of Code", 2024): the update :math:`u` is kept only where it agrees in sign
        with the gradient, :math:`m = [u \\odot g > 0]`, and rescaled by
        ``numel / (m.sum() + 1)`` per tensor, as the paper's code does. The fused paths
        then read each tensor twice (a reduction pass for ``m.sum()``), and ``flat=True``
        is refused."""


@_doc
class GD(Optimizer):
    r"""Gradient descent, the article's section 3.1: :math:`\theta_t = \theta_{t-1} - \gamma g_t`.

    "Full batch" is a property of the gradient the caller passes (the whole data
    set's), not of the update, which is :class:`SGD` without momentum; both run the
    same rule.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 0.01
        Learning rate :math:`\gamma` (the article's ``learning_rate = 0.01``).
    {common}
    """

    cli_name = "gd"
    weight_decay_kind = "none"

    rule = rules.sgd

    def __init__(self, params: Any, lr: float = 0.01, **options: Any) -> None:
        super().__init__(params, dict(lr=lr), **options)

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        return dict(momentum=0.0, dampening=0.0, weight_decay=0.0, nesterov=False,
                    maximize=False, first_step=False, cautious=False)


@_doc
class SGD(Optimizer):
    r"""Stochastic gradient descent, with optional (Nesterov) momentum.

    .. math::

        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
        b_t &= \begin{cases} g_t & t = 1 \\ \mu b_{t-1} + (1-\tau) g_t & t > 1\end{cases} \\
        \theta_t &= \theta_{t-1} - \gamma\,(g_t + \mu b_t \text{ if nesterov else } b_t)

    Without momentum, :math:`\theta_t = \theta_{t-1} - \gamma g_t`. Same as
    ``torch.optim.SGD``. Nesterov momentum: Sutskever et al., "On the importance
    of initialization and momentum in deep learning", ICML 2013.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-3
        Learning rate :math:`\gamma`.
    momentum : float, default 0
        Momentum factor :math:`\mu`.
    dampening : float, default 0
        Dampening :math:`\tau` of the momentum.
    weight_decay : float, default 0
        L2 penalty :math:`\lambda` added to the gradient.
    nesterov : bool, default False
        Nesterov momentum; needs ``momentum > 0`` and ``dampening == 0``.
    maximize : bool, default False
        Ascend instead of descend.
    {cautious}
        With momentum only: :math:`u` is the momentum step (with Nesterov's correction);
        without momentum the option does nothing.
    {common}

    Notes
    -----
    The article's mini-batch SGD (section 4.3) divides each batch's gradient by
    ``batch_size`` even for a last, shorter batch, and with ``batch_size=10`` on
    its 4 samples every step uses 4 samples scaled by 1/10. Here the gradient is
    whatever the caller passes; :func:`optim_core.fit` averages over the actual batch.
    """

    cli_name = "sgd"
    weight_decay_kind = "l2"

    quantized_states = {"momentum_buffer": True}
    rule = rules.sgd
    hyperparameter_checks = _CAUTIOUS

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0, dampening: float = 0,
                 weight_decay: float = 0, nesterov: bool = False, *, maximize: bool = False,
                 cautious: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, dampening=dampening,
                                      weight_decay=weight_decay, nesterov=nesterov,
                                      maximize=maximize, cautious=cautious), **options)

    related_hyperparameters = frozenset({"nesterov", "momentum", "dampening"})

    @classmethod
    def check_relations(cls, group: Mapping[str, Any]) -> None:
        if group["nesterov"] and (group["momentum"] <= 0 or group["dampening"] != 0):
            raise ValueError("nesterov momentum requires momentum > 0 and dampening == 0")

    def active_states(self, group: Mapping[str, Any]) -> set[str]:
        return {"momentum_buffer"} if group["momentum"] != 0 else set()


@_doc
class DGD(Optimizer):
    r"""The founding article's "dynamic gradient descent" (sections 3.3 and 4.4).

    .. math::

        v_t &= v_{t-1} + g_t \\
        \theta_t &= \theta_{t-1} - \alpha_t v_t, \qquad \alpha_t = \gamma\,d^{\,t-1}

    exactly as the article's code does it: the velocity sums every gradient with
    no decay, and the step size is multiplied by ``decay`` after every step. Since
    :math:`\sum_t \alpha_t = \gamma / (1-d)`, the total distance it can travel is
    bounded (0.1 for the article's ``lr=0.01, decay=0.9``), so it stalls unless
    ``decay`` is close to 1. Nor does it converge with ``decay`` near 1: on a
    quadratic with curvature :math:`a`, one step maps :math:`(\theta, v)` by a
    matrix of determinant 1 (:math:`\det = (1-\alpha a) + \alpha a`), so without
    damping the iterate orbits the minimum, and the decaying step only freezes
    the orbit wherever it is. It is not a published algorithm; compare
    :class:`SGD` with momentum, which decays the velocity instead of the step.

    The decay is kept as a running product :math:`d^{t-1}` multiplied by the
    group's current ``lr``, so a schedule that changes ``lr`` still applies.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 0.01
        Initial step size :math:`\gamma` (the article's ``learning_rate``).
    decay : float, default 0.9
        Factor :math:`d` applied to the step size after every step (``alpha_decay``).
    {common}
    """

    cli_name = "dgd"
    weight_decay_kind = "none"

    rule = rules.dgd

    def __init__(self, params: Any, lr: float = 0.01, decay: float = 0.9,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, decay=decay), **options)

    initial_group_state = {"decay_product": 1.0}

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        alpha = group["lr"] * group_state["decay_product"]
        group_state["decay_product"] *= group["decay"]
        return {"alpha": alpha}


@_doc
class Adagrad(Optimizer):
    r"""Adagrad (Duchi, Hazan & Singer, "Adaptive Subgradient Methods", JMLR 2011).

    .. math::

        g_t &= \pm\nabla f(\theta_{t-1}) + \lambda\theta_{t-1} \\
        \tilde\gamma_t &= \gamma / (1 + (t-1)\eta) \\
        s_t &= s_{t-1} + g_t^2 \\
        \theta_t &= \theta_{t-1} - \tilde\gamma_t\, g_t / (\sqrt{s_t} + \epsilon)

    Same as ``torch.optim.Adagrad``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 0.01
    lr_decay : float, default 0
        :math:`\eta`.
    weight_decay : float, default 0
        L2 penalty :math:`\lambda`.
    initial_accumulator_value : float, default 0
        Initial value of :math:`s`.
    eps : float, default 1e-10
    maximize : bool, default False
    {common}

    Notes
    -----
    The article's "adagrad" (section 4.5) also multiplies its step size by
    ``alpha_decay = 0.9`` after every step, on top of Adagrad's own decay of the
    effective step, and uses ``eps = 1e-6``; with decay 0.9 it stops moving after
    a few dozen steps. Use ``lr_decay`` or a schedule for a decaying step.
    """

    cli_name = "adagrad"
    weight_decay_kind = "l2"

    rule = rules.adagrad
    initial_state = {"sum": "initial_accumulator_value"}

    def __init__(self, params: Any, lr: float = 0.01, lr_decay: float = 0,
                 weight_decay: float = 0, initial_accumulator_value: float = 0,
                 eps: float = 1e-10, *, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, lr_decay=lr_decay, weight_decay=weight_decay,
                                      initial_accumulator_value=initial_accumulator_value,
                                      eps=eps, maximize=maximize), **options)

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        return {"clr": group["lr"] / (1 + (group_state["step"] - 1) * group["lr_decay"])}


@_doc
class RMSprop(Optimizer):
    r"""RMSprop (Hinton, Coursera lecture 6e, 2012; centered form: Graves, arXiv:1308.0850).

    .. math::

        v_t &= \alpha v_{t-1} + (1-\alpha) g_t^2 \\
        \bar g_t &= \alpha \bar g_{t-1} + (1-\alpha) g_t \quad\text{(centered)} \\
        d_t &= \sqrt{v_t - \bar g_t^2} + \epsilon \quad\text{(centered) or}\quad \sqrt{v_t}+\epsilon\\
        b_t &= \mu b_{t-1} + g_t / d_t, \qquad \theta_t = \theta_{t-1} - \gamma b_t
        \quad(\text{or } \theta_{t-1} - \gamma g_t/d_t \text{ if } \mu = 0)

    with :math:`g_t` including the L2 term :math:`\lambda\theta_{t-1}`. Same as
    ``torch.optim.RMSprop``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 0.01
    alpha : float, default 0.99
        Smoothing constant.
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum : float, default 0
    centered : bool, default False
    maximize : bool, default False
    {common}
    """

    cli_name = "rmsprop"
    weight_decay_kind = "l2"

    quantized_states = {"square_avg": False, "grad_avg": True, "momentum_buffer": True}
    rule = rules.rmsprop

    def __init__(self, params: Any, lr: float = 0.01, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0, momentum: float = 0, centered: bool = False, *,
                 maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, alpha=alpha, eps=eps, weight_decay=weight_decay,
                                      momentum=momentum, centered=centered,
                                      maximize=maximize), **options)

    def active_states(self, group: Mapping[str, Any]) -> set[str]:
        return ({"grad_avg"} if group["centered"] else set()) | (
            {"momentum_buffer"} if group["momentum"] > 0 else set())


@_doc
class Adadelta(Optimizer):
    r"""Adadelta (Zeiler, "ADADELTA: An Adaptive Learning Rate Method", arXiv:1212.5701).

    .. math::

        v_t &= \rho v_{t-1} + (1-\rho) g_t^2 \\
        \Delta_t &= \sqrt{u_{t-1} + \epsilon}\,/\,\sqrt{v_t + \epsilon}\; g_t \\
        u_t &= \rho u_{t-1} + (1-\rho)\Delta_t^2 \\
        \theta_t &= \theta_{t-1} - \gamma \Delta_t

    Same as ``torch.optim.Adadelta``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1.0
    rho : float, default 0.9
    eps : float, default 1e-6
    weight_decay : float, default 0
    maximize : bool, default False
    {common}
    """

    cli_name = "adadelta"
    weight_decay_kind = "l2"

    rule = rules.adadelta

    def __init__(self, params: Any, lr: float = 1.0, rho: float = 0.9, eps: float = 1e-6,
                 weight_decay: float = 0, *, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, rho=rho, eps=eps, weight_decay=weight_decay,
                                      maximize=maximize), **options)


def _adam_scalars(group: Mapping[str, Any], step: int) -> dict[str, Any]:
    beta1, beta2 = group["betas"]
    return {"step_size": group["lr"] / (1 - beta1**step),
            "bias_correction2_sqrt": (1 - beta2**step) ** 0.5}


@_doc
class Adam(Optimizer):
    r"""Adam (Kingma & Ba, "Adam: A Method for Stochastic Optimization", ICLR 2015).

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \hat v_t &= \max(\hat v_{t-1}, v_t) \text{ (amsgrad) or } v_t \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\;
                    \frac{m_t}{\sqrt{\hat v_t}/\sqrt{1-\beta_2^t} + \epsilon}

    :math:`g_t` includes the L2 term :math:`\lambda\theta_{t-1}`, or with
    ``decoupled_weight_decay`` the parameter is first scaled by
    :math:`1-\gamma\lambda` (that is :class:`AdamW`). AMSGrad: Reddi, Kale & Kumar,
    "On the Convergence of Adam and Beyond", ICLR 2018. Same as ``torch.optim.Adam``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
    amsgrad : bool, default False
    maximize : bool, default False
    decoupled_weight_decay : bool, default False
    {cautious}
        :math:`u = m_t / (\\sqrt{\\hat v_t}/\\sqrt{1-\\beta_2^t} + \\epsilon)`, before the step
        size; the weight decay is applied as without it.
    {common}

    Notes
    -----
    The article's "adam" (section 4.6) keeps no first moment (its ``v`` is summed
    and never used), sums squared gradients without decay (that is Adagrad),
    applies no bias correction, and multiplies its step size by 0.9 every step.
    """

    cli_name = "adam"
    weight_decay_kind = "switchable"

    quantized_states = {"exp_avg": True, "exp_avg_sq": False, "max_exp_avg_sq": False}
    rule = rules.adam
    hyperparameter_checks = _CAUTIOUS

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, amsgrad: bool = False, *,
                 maximize: bool = False, decoupled_weight_decay: bool = False,
                 cautious: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, amsgrad=amsgrad,
                                      maximize=maximize,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      cautious=cautious), **options)

    def active_states(self, group: Mapping[str, Any]) -> set[str]:
        return {"max_exp_avg_sq"} if group["amsgrad"] else set()

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        return _adam_scalars(group, group_state["step"])


@_doc
class AdamW(Adam):
    r"""AdamW (Loshchilov & Hutter, "Decoupled Weight Decay Regularization", ICLR 2019).

    :class:`Adam` with ``decoupled_weight_decay=True``: each step first scales the
    parameter by :math:`1 - \gamma\lambda`, then applies Adam's update without an
    L2 term. Same as ``torch.optim.AdamW``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 1e-2
    amsgrad : bool, default False
    maximize : bool, default False
    {cautious}
        As :class:`Adam`'s (the decay is applied as without it).
    {common}
    """

    cli_name = "adamw"
    weight_decay_kind = "decoupled"

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *,
                 maximize: bool = False, cautious: bool = False, **options: Any) -> None:
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         decoupled_weight_decay=True, cautious=cautious, **options)


@_doc
class Adamax(Optimizer):
    r"""Adamax, Adam with the infinity norm (Kingma & Ba 2015, section 7.1).

    .. math::

        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        u_t &= \max(\beta_2 u_{t-1}, |g_t| + \epsilon) \\
        \theta_t &= \theta_{t-1} - \frac{\gamma}{1-\beta_1^t}\,\frac{m_t}{u_t}

    Same as ``torch.optim.Adamax``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 2e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
    maximize : bool, default False
    {common}
    """

    cli_name = "adamax"
    weight_decay_kind = "l2"

    rule = rules.adamax

    def __init__(self, params: Any, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, *, maximize: bool = False,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, maximize=maximize), **options)

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        return {"clr": group["lr"] / (1 - group["betas"][0] ** group_state["step"])}


@_doc
class NAdam(Optimizer):
    r"""NAdam, Adam with Nesterov momentum (Dozat, "Incorporating Nesterov Momentum into Adam", 2016).

    .. math::

        \mu_t &= \beta_1\,(1 - \tfrac12\, 0.96^{t\psi}), \qquad \Pi_t = \textstyle\prod_{i\le t}\mu_i \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t, \qquad v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        d_t &= \sqrt{v_t / (1-\beta_2^t)} + \epsilon \\
        \theta_t &= \theta_{t-1} - \gamma\frac{1-\mu_t}{1-\Pi_t}\frac{g_t}{d_t}
                    - \gamma\frac{\mu_{t+1}}{1-\Pi_t\mu_{t+1}}\frac{m_t}{d_t}

    with momentum decay :math:`\psi`. Same as ``torch.optim.NAdam``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 2e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum_decay : float, default 4e-3
    decoupled_weight_decay : bool, default False
    maximize : bool, default False
    {common}
    """

    cli_name = "nadam"
    weight_decay_kind = "switchable"

    rule = rules.nadam

    def __init__(self, params: Any, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, momentum_decay: float = 4e-3,
                 decoupled_weight_decay: bool = False, *, maximize: bool = False,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay, momentum_decay=momentum_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize), **options)

    initial_group_state = {"mu_product": 1.0}

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        step, lr, psi = group_state["step"], group["lr"], group["momentum_decay"]
        beta1, beta2 = group["betas"]
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (step * psi)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((step + 1) * psi)))
        group_state["mu_product"] *= mu
        mu_product = group_state["mu_product"]
        return {"bias_correction2": 1 - beta2**step,
                "grad_step": lr * (1.0 - mu) / (1.0 - mu_product),
                "exp_avg_step": lr * mu_next / (1.0 - mu_product * mu_next)}


@_doc
class RAdam(Optimizer):
    r"""RAdam, rectified Adam (Liu et al., "On the Variance of the Adaptive Learning Rate and Beyond", ICLR 2020).

    .. math::

        \rho_\infty &= 2/(1-\beta_2) - 1, \qquad
        \rho_t = \rho_\infty - 2t\beta_2^t/(1-\beta_2^t) \\
        \hat m_t &= m_t / (1-\beta_1^t) \\
        \theta_t &= \theta_{t-1} - \gamma\,\hat m_t\,
            \frac{\sqrt{1-\beta_2^t}}{\sqrt{v_t}+\epsilon}\, r_t \quad (\rho_t > 5),
            \qquad \theta_{t-1} - \gamma\hat m_t \quad\text{otherwise}

    with :math:`r_t = \sqrt{\frac{(\rho_t-4)(\rho_t-2)\rho_\infty}{(\rho_\infty-4)(\rho_\infty-2)\rho_t}}`
    and :math:`m_t, v_t` as in :class:`Adam`. Same as ``torch.optim.RAdam``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
    decoupled_weight_decay : bool, default False
    maximize : bool, default False
    {common}
    """

    cli_name = "radam"
    weight_decay_kind = "switchable"

    rule = rules.radam

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0, decoupled_weight_decay: bool = False,
                 *, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps,
                                      weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      maximize=maximize), **options)

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        step = group_state["step"]
        beta1, beta2 = group["betas"]
        bias_correction2 = 1 - beta2**step
        rho_inf = 2 / (1 - beta2) - 1
        rho_t = rho_inf - 2 * step * (beta2**step) / bias_correction2
        rectify = rho_t > 5.0
        if rho_inf > 5.0:
            # rho_t >= 1 and rho_inf > 5: no zero divisor. The ratio is negative on some
            # steps that do not rectify, so the root is taken of 1 there (one definition
            # for host floats and traced arrays: see scalar_math).
            ratio = (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)
            rect = scalar_math.sqrt(scalar_math.where(rectify, ratio, 1.0))
        else:
            rect = 1.0  # rho_t <= rho_inf <= 5: never rectifies
        return {"bias_correction1": 1 - beta1**step,
                "bias_correction2_sqrt": bias_correction2**0.5,
                "rectify": rectify, "rect": rect}


@_doc
class Lion(Optimizer):
    r"""Lion, evolved sign momentum (Chen et al., "Symbolic Discovery of Optimization Algorithms", 2023).

    .. math::

        c_t &= \beta_1 m_{t-1} + (1-\beta_1) g_t \\
        \theta_t &= (1-\gamma\lambda)\,\theta_{t-1} - \gamma\,\mathrm{sign}(c_t) \\
        m_t &= \beta_2 m_{t-1} + (1-\beta_2) g_t

    As the paper's Program 1 (decoupled weight decay :math:`\lambda`).

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-4
    betas : (float, float), default (0.9, 0.99)
    weight_decay : float, default 0
    maximize : bool, default False
    {cautious}
        :math:`u = \\mathrm{sign}(c_t)`, as the paper's C-Lion.
    {common}
    """

    cli_name = "lion"
    weight_decay_kind = "decoupled"

    quantized_states = {"exp_avg": True}
    rule = rules.lion
    hyperparameter_checks = _CAUTIOUS

    def __init__(self, params: Any, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0, *, maximize: bool = False, cautious: bool = False,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, weight_decay=weight_decay,
                                      maximize=maximize, cautious=cautious), **options)


def _ns_coefficients(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 3:
        raise _checks.WrongTypeError(f"{name} must be three numbers (a, b, c), got "
                                     f"{value!r:.80}")
    return tuple(_checks.number(f"{name}[{i}]", v) for i, v in enumerate(value))


def _ns_steps(name: str, value: Any) -> int:
    steps = _checks.integer(name, value, minimum=0)
    if steps >= 100:  # torch's limit
        raise ValueError(f"{name} must be less than 100, got {steps}")
    return steps


def _adjust_lr_fn(name: str, value: Any) -> str | None:
    return _checks.choice(name, value, (None, "original", "match_rms_adamw"))


def _ns_dtype(name: str, value: Any) -> str | None:
    return _checks.choice(name, value, (None, "bfloat16"))


@_doc
class Muon(Optimizer):
    r"""Muon, momentum orthogonalized by Newton-Schulz (Jordan et al. 2024, "Muon: An
    optimizer for hidden layers in neural networks"), as ``torch.optim.Muon``.

    .. math::

        B_t &= \mu B_{t-1} + (1-\mu) G_t \quad (\texttt{lerp}) \\
        \tilde B_t &= (1-\mu) G_t + \mu B_t \text{ (nesterov) or } B_t \\
        O_t &= \mathrm{NS}^{(a,b,c)}_k(\tilde B_t;\ \epsilon) \\
        \theta_t &= (1-\gamma\lambda)\,\theta_{t-1} - \gamma\,r(A, B)\,O_t

    for a parameter of shape :math:`A \times B`, with :math:`k` steps of the quintic
    Newton-Schulz iteration :math:`X \leftarrow aX + (bXX^\top + c(XX^\top)^2)X` from
    :math:`X_0 = \tilde B_t/\max(\lVert\tilde B_t\rVert_F, \epsilon)`, and the learning-rate
    ratio :math:`r = \sqrt{\max(1, A/B)}` (``adjust_lr_fn=None`` or ``"original"``,
    Keller Jordan's) or :math:`r = 0.2\sqrt{\max(A, B)}` (``"match_rms_adamw"``, Liu et
    al. 2025, "Muon is Scalable for LLM Training", so that AdamW's ``lr`` and
    ``weight_decay`` carry over).

    The rule (:func:`optim_core.optim.rules.muon`) calls ``orthogonalize``, a matrix
    operation of the rule language: the generic path runs it with the namespace's own
    ``matmul``; the fused paths run the momentum and the parameter update as generated
    kernels and the iteration through NumPy's (BLAS) or CuPy's (cuBLAS) ``matmul``.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
        2-D parameters, except in groups with ``use_muon=False``.
    lr : float, default 1e-3
    weight_decay : float, default 0.1
        Decoupled weight decay :math:`\lambda` (the parameter is scaled by
        :math:`1 - \gamma\lambda`).
    momentum : float, default 0.95
    nesterov : bool, default True
    ns_coefficients : (float, float, float), default (3.4445, -4.7750, 2.0315)
    eps : float, default 1e-7
        Lower bound of the norm the update is divided by before the iteration.
    ns_steps : int, default 5
        Newton-Schulz iterations (fewer than 100).
    adjust_lr_fn : {None, "original", "match_rms_adamw"}, default None
    ns_dtype : {None, "bfloat16"}, default None
        The dtype the iteration runs in. None: the parameter's own (float64 matches
        torch's algorithm to rounding). "bfloat16": as torch 2.13, which always iterates
        in bfloat16: every operation rounded to bfloat16 (products accumulated in
        float32), on NumPy through ``ml_dtypes.bfloat16``, on torch in its own; CuPy
        has no bfloat16.
    use_muon : bool, default True
        False in a param group runs AdamW on it instead (any shape): the biases, gains
        and embeddings that Muon is not meant for, as in practice, with the group's
        ``lr``, ``weight_decay``, ``betas`` and ``adamw_eps`` (see Notes).
    betas : (float, float), default (0.9, 0.999)
        AdamW's, for ``use_muon=False`` groups.
    adamw_eps : float, default 1e-8
        AdamW's ``eps``, for ``use_muon=False`` groups (``eps`` is Newton-Schulz's).
    {common}

    Notes
    -----
    One object for a whole model, as Muon is used (Keller Jordan's ``MuonWithAuxAdam``
    groups, ``use_muon`` per group)::

        opt = optim_core.Muon([
            {"params": hidden_matrices},                      # Muon, lr=0.02
            {"params": embeddings_biases_gains, "use_muon": False,
             "lr": 3e-4, "weight_decay": 0.01},               # AdamW
        ], lr=0.02)

    A ``use_muon=False`` group steps exactly as :class:`AdamW` with the same ``lr``,
    ``betas``, ``eps=adamw_eps`` and ``weight_decay`` (bit for bit: the rule's second
    branch is Adam's decoupled update). torch has no such groups: there one makes a
    ``torch.optim.Muon`` and a ``torch.optim.AdamW`` and steps both.

    A dict of name -> array that holds other arrays than matrices (a whole model's
    parameters, as :func:`optim_core.fit` passes them) is split in two groups, the
    matrices (Muon) and the rest (``use_muon=False``, AdamW), in that order. Groups and
    lists are taken as given: a 2-D-only group that holds another shape is a
    ValueError, as in torch.

    ``flat=True`` is refused: each matrix is orthogonalized on its own.
    """

    cli_name = "muon"
    weight_decay_kind = "decoupled"

    rule = rules.muon

    hyperparameter_checks = {
        "ns_coefficients": Hyperparameter(_ns_coefficients, ("ns_a", "ns_b", "ns_c")),
        "ns_steps": Hyperparameter(_ns_steps),
        "adjust_lr_fn": Hyperparameter(_adjust_lr_fn),
        "ns_dtype": Hyperparameter(_ns_dtype),
        "use_muon": Hyperparameter(_checks.boolean),
        "adamw_eps": Hyperparameter(lambda name, value: _checks.number(name, value, low=0)),
    }
    tensor_scalar_names = ("adjusted_lr",)

    def __init__(self, params: Any, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True,
                 ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None, *,
                 ns_dtype: str | None = None, use_muon: bool = True,
                 betas: tuple[float, float] = (0.9, 0.999), adamw_eps: float = 1e-8,
                 **options: Any) -> None:
        if options.get("flat"):
            raise ValueError("Muon orthogonalizes each matrix on its own: flat=True, which "
                             "joins them into one buffer, is not supported")
        super().__init__(_matrices_apart(params), dict(
                                      lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_coefficients=ns_coefficients,
                                      eps=eps, ns_steps=ns_steps, adjust_lr_fn=adjust_lr_fn,
                                      ns_dtype=ns_dtype, use_muon=use_muon, betas=betas,
                                      adamw_eps=adamw_eps), **options)
        for group in self.param_groups:
            if group["use_muon"]:
                for name, param in zip(group["names"], group["params"]):
                    _check_matrix(name, param)
            if group["ns_dtype"] == "bfloat16":
                from ..backends._operations import bfloat16_dtype

                bfloat16_dtype(self._xp)  # ImportError or TypeError now, not at a step

    def active_states(self, group: Mapping[str, Any]) -> set[str]:
        return {"momentum_buffer"} if group["use_muon"] else {"exp_avg", "exp_avg_sq"}

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        return {**_adam_scalars(group, group_state["step"]),
                "ns_bfloat16": group["ns_dtype"] == "bfloat16"}

    def tensor_scalars(self, group: Mapping[str, Any], scalars: Mapping[str, Any],
                       shape: tuple[int, ...], dtype: Any = None) -> dict[str, Any]:
        """``adjusted_lr``: torch's ``_adjust_lr`` of the matrix's shape."""
        if not group["use_muon"]:
            return {"adjusted_lr": group["lr"]}
        if len(shape) != 2:
            raise ValueError(f"Muon only supports 2-D parameters, got shape {shape}; put "
                             "the others in a group with use_muon=False (AdamW)")
        rows, columns = shape
        if group["adjust_lr_fn"] == "match_rms_adamw":
            ratio = 0.2 * math.sqrt(max(rows, columns))
        else:  # None or "original"
            ratio = math.sqrt(max(1, rows / columns)) if columns else 1.0
        return {"adjusted_lr": group["lr"] * ratio}


def _matrices_apart(params: Any) -> Any:
    """A dict of arrays holding non-matrices as two groups, the matrices first (see Muon)."""
    if not isinstance(params, Mapping) or "params" in params or all(
            len(getattr(p, "shape", ())) == 2 for p in params.values()):
        return params
    matrices = {k: p for k, p in params.items() if len(getattr(p, "shape", ())) == 2}
    others = {k: p for k, p in params.items() if k not in matrices}
    return ([{"params": matrices}] if matrices else []) + [{"params": others,
                                                            "use_muon": False}]


def _check_matrix(name: str, param: Any) -> None:
    if len(param.shape) != 2:
        raise ValueError(f"Muon only supports 2-D parameters, got {name!r} of shape "
                         f"{tuple(param.shape)}; put the others in a group with "
                         "use_muon=False (AdamW)")
