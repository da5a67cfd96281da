"""The optimizers whose rules reduce each tensor (issue 13): LAMB, LARS, Adafactor.

Their rules (:mod:`.rules_pertensor`) use the per-tensor reductions of the rule
language, so the fused paths read each tensor twice (a reduction pass, then the
update) and ``flat=True`` is refused. Names, defaults and numbers follow the reference
each class names; where the reference's names differ, the docstring maps them.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from typing import Any

from .. import _checks
from . import rules_pertensor as rules
from .algorithms import _doc
from .base import Optimizer
from .param_group import Hyperparameter

__all__ = ["LAMB", "LARS", "Adafactor"]


def _nonnegative(name: str, value: Any) -> float:
    return _checks.number(name, value, low=0)


@_doc
class LAMB(Optimizer):
    r"""LAMB, layer-wise adaptive moments (You et al., "Large Batch Optimization for Deep
    Learning: Training BERT in 76 minutes", ICLR 2020), as ``optax.lamb``.

    .. math::

        m_t &= (1-\beta_1) g_t + \beta_1 m_{t-1}, \qquad
        v_t = (1-\beta_2) g_t^2 + \beta_2 v_{t-1} \\
        u_t &= \frac{m_t / (1-\beta_1^t)}{\sqrt{v_t/(1-\beta_2^t) + \epsilon_{root}} + \epsilon}
               + \lambda\theta_{t-1} \\
        \theta_t &= \theta_{t-1} - \gamma\, r_t u_t, \qquad
        r_t = \frac{\lVert\theta_{t-1}\rVert}{\lVert u_t\rVert}
        \ (1 \text{ if either norm is } 0)

    with the norms over each whole tensor (the trust ratio :math:`r_t`).

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-3
        optax's ``learning_rate`` (which has no default).
    betas : (float, float), default (0.9, 0.999)
        optax's ``(b1, b2)``.
    eps : float, default 1e-6
    eps_root : float, default 0
    weight_decay : float, default 0
        :math:`\lambda`; optax's ``mask`` is a param group with ``weight_decay=0``.
    maximize : bool, default False
        Ascend instead of descend (not in optax: the gradient's sign flipped).
    {common}
    """

    cli_name = "lamb"
    weight_decay_kind = "decoupled"

    rule = rules.lamb
    hyperparameter_checks = {"eps_root": Hyperparameter(_nonnegative)}

    def __init__(self, params: Any, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, eps_root: float = 0.0, weight_decay: float = 0.0, *,
                 maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, eps_root=eps_root,
                                      weight_decay=weight_decay, maximize=maximize), **options)

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        beta1, beta2 = group["betas"]
        step = group_state["step"]
        return {"bias_correction1": 1 - beta1**step, "bias_correction2": 1 - beta2**step}


@_doc
class LARS(Optimizer):
    r"""LARS, layer-wise adaptive rate scaling (You, Gitman & Ginsburg, "Large Batch
    Training of Convolutional Networks", 2017), as ``optax.lars``.

    .. math::

        g'_t &= g_t + \lambda\theta_{t-1}, \qquad
        r_t = \frac{\eta\,\lVert\theta_{t-1}\rVert}{\lVert g'_t\rVert + \epsilon}
        \ (1 \text{ if either norm is } 0) \\
        b_t &= -\gamma\, r_t g'_t + \mu b_{t-1} \\
        \theta_t &= \theta_{t-1} + (-\gamma r_t g'_t + \mu b_t \text{ if nesterov else } b_t)

    with the norms over each whole tensor. As in optax the momentum buffer ``trace``
    holds the update already scaled by :math:`-\gamma`.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-3
        :math:`\gamma`, optax's ``learning_rate`` (which has no default).
    momentum : float, default 0.9
        :math:`\mu`.
    nesterov : bool, default False
    weight_decay : float, default 0
        :math:`\lambda`; optax's ``weight_decay_mask`` is a param group with
        ``weight_decay=0``.
    trust_coefficient : float, default 0.001
        :math:`\eta`.
    eps : float, default 0
    trust_ratio : bool, default True
        Scale by the trust ratio; optax's ``trust_ratio_mask`` is a param group with
        ``trust_ratio=False`` (LARS's usual exclusion of biases and norms' scales).
    maximize : bool, default False
        Ascend instead of descend (not in optax: the gradient's sign flipped).
    {common}
    """

    cli_name = "lars"
    weight_decay_kind = "l2"

    rule = rules.lars
    hyperparameter_checks = {"trust_coefficient": Hyperparameter(_nonnegative),
                             "trust_ratio": Hyperparameter(_checks.boolean)}

    def __init__(self, params: Any, lr: float = 1e-3, momentum: float = 0.9,
                 nesterov: bool = False, weight_decay: float = 0.0,
                 trust_coefficient: float = 0.001, eps: float = 0.0, trust_ratio: bool = True,
                 *, maximize: bool = False, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, nesterov=nesterov,
                                      weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, eps=eps,
                                      trust_ratio=trust_ratio, maximize=maximize), **options)


def _adafactor_eps(name: str, value: Any) -> tuple[float | None, float]:
    """torch's ``eps=(eps1, eps2)``: eps1 a number >= 0 or None (the dtype's machine
    epsilon), eps2 a number >= 0."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != 2:
        raise _checks.WrongTypeError(f"{name} must be a pair (eps1 or None, eps2), got "
                                     f"{value!r:.80}")
    eps1 = None if value[0] is None else _checks.number(f"{name}[0]", value[0], low=0)
    return eps1, _checks.number(f"{name}[1]", value[1], low=0)


def _nonpositive(name: str, value: Any) -> float:
    return _checks.number(name, value, high=0)


def _at_least_one(name: str, value: Any) -> float:
    return _checks.number(name, value, low=1)


@_doc
class Adafactor(Optimizer):
    r"""Adafactor (Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear
    Memory Cost", ICML 2018), as ``torch.optim.Adafactor``.

    For a parameter of two or more dimensions the second moment is factored over its
    last two: a row factor :math:`R_t` (one value per row, shape ``(..., rows, 1)``) and
    a column factor :math:`C_t` (``(..., 1, columns)``), so a matrix of :math:`n \times m`
    keeps :math:`n + m` state values instead of :math:`nm`:

    .. math::

        \hat\beta_t &= t^{c}, \qquad \rho_t = \min(\gamma, 1/\sqrt t), \qquad
        \alpha_t = \max(\epsilon_2, \mathrm{RMS}(\theta_{t-1}))\, \rho_t \\
        \theta'_{t-1} &= \theta_{t-1}(1 - \gamma\lambda) \\
        R_t &= \mathrm{lerp}(R_{t-1}, \mathrm{mean}_{-1}(g_t^2), \hat\beta_t), \qquad
        C_t = \mathrm{lerp}(C_{t-1}, \mathrm{mean}_{-2}(g_t^2), \hat\beta_t) \\
        \hat V_t &= \frac{R_t C_t}{\max(\mathrm{mean}_{-2}(R_t), \epsilon_1)}
        \quad \text{(a vector or 0-d tensor: }
        \hat V_t = V_t = \mathrm{lerp}(V_{t-1}, g_t^2, \hat\beta_t)\text{)} \\
        U_t &= g_t / \sqrt{\max(\hat V_t, \epsilon_1^2)}, \qquad
        \theta_t = \theta'_{t-1} - \frac{\alpha_t}{\max(1, \mathrm{RMS}(U_t)/d)} U_t

    with :math:`c` = ``beta2_decay``, :math:`\mathrm{RMS}(x) = \lVert x\rVert_2 /
    \sqrt{\mathrm{numel}(x)}` over the whole tensor and ``lerp(a, b, w) = a + w (b - a)``.
    The operations and their order are torch 2.13's ``_single_tensor_adafactor``, except
    that the two norms stay on the device (torch reads each back with ``.item()``, a host
    synchronization per tensor and norm). The states are torch's: ``row_var`` and
    ``col_var`` for tensors of two or more dimensions, ``variance`` for the others. An
    empty tensor steps to no change (torch divides by its zero size and raises).

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1e-2
        :math:`\gamma`, the largest relative step size.
    beta2_decay : float, default -0.8
        :math:`c \le 0`: the second moment's weight at step :math:`t` is :math:`t^c`.
    eps : (float or None, float), default (None, 1e-3)
        :math:`(\epsilon_1, \epsilon_2)`: the floor of the second moment's estimate
        (None: the machine epsilon of the parameter's dtype) and of the parameter's RMS.
    d : float, default 1.0
        The clipping threshold of the update's RMS, :math:`\ge 1`.
    weight_decay : float, default 0
        :math:`\lambda`, decoupled (scaled by ``lr``, as in torch).
    maximize : bool, default False
        Ascend instead of descend.
    {common}

    Notes
    -----
    On NumPy the fused path runs each factored tensor in one compiled call of generated
    loops (:mod:`optim_core.backends._factored`): a pass for the row and column means and
    the parameter's norm, a pass over the rows for the row factor's mean, one for the
    update's norm, and the update, reading the gradient three times and writing the
    parameter once; 0-d and 1-D tensors take the elementwise kernel with its reduction
    passes. On CuPy the same lowered rule is generated as CUDA passes
    (:mod:`optim_core.backends._cuda_factored`: a pass over rows for the row means
    and norms, one over columns for the column means, then the update and the row and
    column states), with no host synchronization; ``flat=True`` is refused. torch's
    ``foreach`` has no counterpart: every tensor is stepped by the same rule.
    """

    cli_name = "adafactor"
    weight_decay_kind = "decoupled"

    rule = rules.adafactor
    hyperparameter_checks = {"beta2_decay": Hyperparameter(_nonpositive),
                             "eps": Hyperparameter(_adafactor_eps),
                             "d": Hyperparameter(_at_least_one)}
    tensor_scalar_names = ("factored", "eps1")

    def __init__(self, params: Any, lr: float = 1e-2, beta2_decay: float = -0.8,
                 eps: tuple[float | None, float] = (None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, *, maximize: bool = False,
                 **options: Any) -> None:
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d,
                                      weight_decay=weight_decay, maximize=maximize), **options)

    def active_states(self, group: Mapping[str, Any]) -> set[str]:
        # Each tensor holds those its number of dimensions allows (the rule's state_shapes).
        return {"row_var", "col_var", "variance"}

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        step = float(group_state["step"])
        return {"eps2": group["eps"][1], "one_minus_beta2_t": step ** group["beta2_decay"],
                "rho": min(group["lr"], 1 / step ** 0.5)}

    def tensor_scalars(self, group: Mapping[str, Any], scalars: Mapping[str, Any],
                       shape: tuple[int, ...], dtype: Any = None) -> dict[str, Any]:
        """``factored`` (two or more dimensions) and ``eps1`` (None: torch's machine
        epsilon of the parameter's dtype)."""
        eps1 = group["eps"][0]
        if eps1 is None:
            eps1 = _machine_epsilon(self._xp, dtype)
        return {"factored": len(shape) >= 2, "eps1": eps1}


def _machine_epsilon(xp: Any, dtype: Any) -> float:
    """``finfo(dtype).eps`` of the parameters' namespace, or of the library the dtype
    comes from (optim_core.torch steps torch tensors through NumPy views)."""
    try:
        return float(xp.finfo(dtype).eps)
    except (TypeError, AttributeError, ValueError):
        library = sys.modules[type(dtype).__module__.split(".")[0]]
        return float(library.finfo(dtype).eps)
