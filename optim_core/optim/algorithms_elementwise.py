"""The newer elementwise optimizers (issue 13): hyperparameters, host scalars and documentation.

The math lives in :mod:`optim_core.optim.rules_elementwise`. Names, defaults and
numbers follow ``torch.optim`` where torch has the optimizer, and the reference
implementation each docstring names otherwise (the mapping of names is documented
where the reference's differ).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .. import _checks
from . import rules_elementwise as rules
from . import scalar_math
from .algorithms import _doc
from .base import Optimizer
from .param_group import Hyperparameter

__all__ = ["ASGD", "Rprop", "ADOPT", "AdEMAMix"]


def _nonnegative(name: str, value: Any) -> float:
    return _checks.number(name, value, low=0)


def _count(name: str, value: Any) -> int:
    return _checks.integer(name, value, minimum=0)


def _beta_triple(name: str, value: Any) -> tuple[float, float, float]:
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") \
            or not hasattr(value, "__getitem__"):
        raise _checks.WrongTypeError(f"{name} must be three numbers (beta1, beta2, beta3), "
                                     f"got {value!r:.80}")
    if len(value) != 3:
        raise ValueError(f"{name} must be three numbers (beta1, beta2, beta3), got "
                         f"{len(value)} of them")
    return tuple(_checks.number(f"{name}[{i}]", v, low=0, high=1, high_open=True)
                 for i, v in enumerate(value))


def _etas(name: str, value: Any) -> tuple[float, float]:
    minus, plus = _checks.number_pair(name, value, low=0)
    if not 0.0 < minus < 1.0 < plus:
        raise ValueError(f"{name} must be (etaminus, etaplus) with 0 < etaminus < 1 < etaplus, "
                         f"got {value!r:.80}")
    return minus, plus


def _step_sizes(name: str, value: Any) -> tuple[float, float]:
    low, high = _checks.number_pair(name, value, low=0)
    if low > high:
        raise ValueError(f"{name} must be (minimum, maximum) with minimum <= maximum, "
                         f"got {value!r:.80}")
    return low, high


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


@_doc
class Rprop(Optimizer):
    r"""Resilient backpropagation (Riedmiller & Braun, "A Direct Adaptive Method for Faster
    Backpropagation Learning: The RPROP Algorithm", ICNN 1993).

    Each element has its own step size :math:`\Delta`, adapted from the sign of
    :math:`d_t = g_t\,g'_{t-1}`, the gradient times the previous step's (the
    magnitude of the gradient is never used):

    .. math::

        \Delta_t &= \operatorname{clip}\bigl(\Delta_{t-1}\cdot
            \begin{cases}\eta_+ & d_t > 0\\ \eta_- & d_t < 0\\ 1 & d_t = 0\end{cases},
            \;\Delta_{\min}, \Delta_{\max}\bigr) \\
        g'_t &= \begin{cases} 0 & d_t < 0 \\ g_t & \text{otherwise}\end{cases} \\
        \theta_t &= \theta_{t-1} - \operatorname{sign}(g'_t)\,\Delta_t

    with :math:`g_t = \pm\nabla f(\theta_{t-1})`, :math:`g'_0 = 0` and
    :math:`\Delta_0 = \gamma`. Same as ``torch.optim.Rprop`` (states ``prev``
    :math:`g'` and ``step_size`` :math:`\Delta`, as torch names them). ``lr`` only sets
    the initial step sizes: changing it after the first step changes nothing, as in torch.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-2
        Initial step size :math:`\gamma`.
    etas : (float, float), default (0.5, 1.2)
        :math:`(\eta_-, \eta_+)`, with :math:`0 < \eta_- < 1 < \eta_+`.
    step_sizes : (float, float), default (1e-6, 50)
        :math:`(\Delta_{\min}, \Delta_{\max})`, with
        :math:`0 \le \Delta_{\min} \le \Delta_{\max}` (torch does not check them).
    maximize : bool, default False
    {common}

    Notes
    -----
    Rprop is meant for full-batch gradients: the signs of mini-batch gradients flip
    by noise, which shrinks the steps.
    """

    cli_name = "rprop"
    weight_decay_kind = "none"

    rule = rules.rprop
    initial_state = {"step_size": "lr"}
    hyperparameter_checks = {
        "etas": Hyperparameter(_etas, ("etaminus", "etaplus")),
        "step_sizes": Hyperparameter(_step_sizes, ("step_size_min", "step_size_max")),
    }

    def __init__(self, params: Any, lr: float = 1e-2, etas: tuple[float, float] = (0.5, 1.2),
                 step_sizes: tuple[float, float] = (1e-6, 50), *, maximize: bool = False,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, etas=etas, step_sizes=step_sizes,
                                      maximize=maximize), **options)


@_doc
class ADOPT(Optimizer):
    r"""ADOPT, Adam with the current gradient left out of its own normalization (Taniguchi
    et al., "ADOPT: Modified Adam Can Converge with Any :math:`\beta_2` with the Optimal
    Rate", NeurIPS 2024).

    .. math::

        v_1 &= g_1^2, \qquad \theta_1 = \theta_0 \quad\text{(the first step only
            initializes)} \\
        u_t &= \operatorname{clip}\bigl(g_t / \max(\sqrt{v_{t-1}}, \epsilon),\;
            \pm (t-1)^{c}\bigr) \\
        m_t &= \beta_1 m_{t-1} + (1-\beta_1) u_t \\
        \theta_t &= \theta_{t-1} - \gamma\, m_t
            \quad(\text{nesterov: } \gamma(\beta_1 m_t + (1-\beta_1) u_t)) \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2

    for :math:`t > 1`, with :math:`g_t = \pm\nabla f(\theta_{t-1})` plus the L2 term
    :math:`\lambda\theta_{t-1}`, or with ``decoupled_weight_decay`` the parameter first
    scaled by :math:`1-\gamma\lambda` (every step, the first included), as the
    authors' implementation does. The clipping (the paper's stabilization, on by
    default) bounds :math:`|u_t|` by :math:`(t-1)^{c}`, :math:`c` = ``clip_exponent``.

    The numbers are ``optax.contrib.adopt``'s (optax 0.2.8). Its names map as
    ``learning_rate`` = ``lr``, ``(b1, b2)`` = ``betas``, ``eps``, ``nesterov``,
    ``use_clipping``, ``clip_value_fn=lambda count: count ** clip_exponent`` (optax's
    ``count`` is :math:`t-1`); optax has no ``maximize`` (negate the gradient) and no
    weight decay (``optax.chain(optax.add_decayed_weights(wd), adopt)`` is the L2
    form, ``add_decayed_weights`` between ``scale_by_adopt`` and the learning rate the
    decoupled one, equal up to rounding). States ``exp_avg`` (optax's ``mu``) and
    ``exp_avg_sq`` (``nu``).

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.9999)
    eps : float, default 1e-6
        Lower bound of :math:`\sqrt{v}` in the normalization.
    weight_decay : float, default 0
    decoupled_weight_decay : bool, default False
    use_clipping : bool, default True
    clip_exponent : float, default 0.25
    nesterov : bool, default False
    maximize : bool, default False
    {common}
    """

    cli_name = "adopt"
    weight_decay_kind = "switchable"

    rule = rules.adopt
    hyperparameter_checks = {"use_clipping": Hyperparameter(_checks.boolean),
                             "clip_exponent": Hyperparameter(_nonnegative)}

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.9999),
                 eps: float = 1e-6, weight_decay: float = 0, decoupled_weight_decay: bool = False,
                 *, use_clipping: bool = True, clip_exponent: float = 0.25,
                 nesterov: bool = False, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      decoupled_weight_decay=decoupled_weight_decay,
                                      use_clipping=use_clipping, clip_exponent=clip_exponent,
                                      nesterov=nesterov, maximize=maximize), **options)

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        step = group_state["step"]
        return {"initialize": step == 1,
                "clip": float(step - 1) ** group["clip_exponent"] if step > 1 else 0.0}


def _half_life(beta: float) -> float:
    """Steps until a weight decayed by ``beta`` per step halves, less one (the paper's f)."""
    return math.log(0.5) / math.log(beta) - 1


@_doc
class AdEMAMix(Optimizer):
    r"""AdEMAMix, Adam with a second, slow momentum mixed in (Pagliardini, Ablin & Grangier,
    "The AdEMAMix Optimizer: Better, Faster, Older", 2024).

    .. math::

        m^{(1)}_t &= \beta_1 m^{(1)}_{t-1} + (1-\beta_1) g_t, \qquad
        m^{(2)}_t = \beta_3(t) m^{(2)}_{t-1} + (1-\beta_3(t)) g_t \\
        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2 \\
        \theta_t &= \theta_{t-1} - \gamma\Bigl(
            \frac{m^{(1)}_t/(1-\beta_1^t) + \alpha(t)\, m^{(2)}_t}
                 {\sqrt{v_t/(1-\beta_2^t) + \bar\epsilon} + \epsilon}
            + \lambda\theta_{t-1}\Bigr)

    with :math:`g_t = \pm\nabla f(\theta_{t-1})`; the slow momentum is not bias
    corrected (it fills slowly on purpose), and the weight decay :math:`\lambda` is
    decoupled and scaled by the learning rate, as in optax and torch's AdamW.

    The paper's warmups (section 3), off by default: with ``alpha_warmup`` :math:`T_\alpha`
    the mixing rises linearly, :math:`\alpha(t) = \alpha\,\min(1, (t-1)/T_\alpha)`;
    with ``beta3_warmup`` :math:`T_\beta` the slow decay moves from :math:`\beta_1` to
    :math:`\beta_3` linearly in half-life, :math:`\beta_3(t) = f^{-1}((1-a) f(\beta_1) +
    a f(\beta_3))` with :math:`a = (t-1)/T_\beta` for :math:`t-1 < T_\beta`,
    :math:`f(\beta) = \ln\frac12/\ln\beta - 1` and :math:`f^{-1}(h) = 0.5^{1/(h+1)}`
    (the authors' ``alpha_scheduler`` and ``beta3_scheduler`` with ``alpha_start=0``
    and ``beta_start=beta1``).

    The numbers are ``optax.contrib.ademamix``'s (optax 0.2.8). Its names map as
    ``learning_rate`` = ``lr``, ``(b1, b2, b3)`` = ``betas``, ``alpha``, ``eps``,
    ``eps_root``, ``weight_decay``; the warmups are its ``alpha`` and ``b3`` given as
    schedules of optax's ``count`` (:math:`t-1`, as above); optax has no ``maximize``
    (negate the gradient). States ``exp_avg_fast`` (optax's ``m1``), ``exp_avg_slow``
    (``m2``) and ``exp_avg_sq`` (``nu``).

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-3
    betas : (float, float, float), default (0.9, 0.999, 0.9999)
        :math:`(\beta_1, \beta_2, \beta_3)`.
    alpha : float, default 5.0
        Weight :math:`\alpha` of the slow momentum.
    eps : float, default 1e-8
    eps_root : float, default 0
        :math:`\bar\epsilon`, added inside the square root.
    weight_decay : float, default 0
    alpha_warmup, beta3_warmup : int, default 0
        Steps of the warmups :math:`T_\alpha`, :math:`T_\beta` (0: none). A
        ``beta3_warmup`` needs :math:`\beta_1, \beta_3 > 0`.
    maximize : bool, default False
    {common}
    """

    cli_name = "ademamix"
    weight_decay_kind = "decoupled"

    rule = rules.ademamix
    hyperparameter_checks = {
        "betas": Hyperparameter(_beta_triple, ("beta1", "beta2", "beta3")),
        "eps_root": Hyperparameter(_nonnegative),
        "alpha_warmup": Hyperparameter(_count),
        "beta3_warmup": Hyperparameter(_count),
    }
    related_hyperparameters = frozenset({"betas", "beta3_warmup"})

    def __init__(self, params: Any, lr: float = 1e-3,
                 betas: tuple[float, float, float] = (0.9, 0.999, 0.9999), alpha: float = 5.0,
                 eps: float = 1e-8, eps_root: float = 0, weight_decay: float = 0, *,
                 alpha_warmup: int = 0, beta3_warmup: int = 0, maximize: bool = False,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, alpha=alpha, eps=eps,
                                      eps_root=eps_root, weight_decay=weight_decay,
                                      alpha_warmup=alpha_warmup, beta3_warmup=beta3_warmup,
                                      maximize=maximize), **options)

    @classmethod
    def check_relations(cls, group: Mapping[str, Any]) -> None:
        beta1, _, beta3 = group["betas"]
        if group["beta3_warmup"] and not (beta1 > 0 and beta3 > 0):
            raise ValueError("beta3_warmup needs betas[0] > 0 and betas[2] > 0 (it "
                             "interpolates their half-lives)")

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        step = group_state["step"]
        count = step - 1  # optax's count: the steps before this one
        beta1, beta2, beta3 = group["betas"]
        alpha = group["alpha"]
        if count < group["alpha_warmup"]:
            alpha = count / group["alpha_warmup"] * alpha
        if count < group["beta3_warmup"]:
            a = count / group["beta3_warmup"]
            beta3 = 0.5 ** (1 / ((1 - a) * _half_life(beta1) + a * _half_life(beta3) + 1))
        return {"alpha": alpha, "beta3": beta3, "bias_correction1": 1 - beta1**step,
                "bias_correction2": 1 - beta2**step}
