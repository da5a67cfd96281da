"""The optimizers whose rules reduce each tensor (issue 13): LAMB, LARS.

Their rules (:mod:`.rules_pertensor`) use the per-tensor reductions of the rule
language, so the fused paths read each tensor twice (a reduction pass, then the
update) and ``flat=True`` is refused. Names, defaults and numbers follow the reference
each class names; where the reference's names differ, the docstring maps them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import _checks
from . import rules_pertensor as rules
from .algorithms import _doc
from .base import Optimizer
from .param_group import Hyperparameter

__all__ = ["LAMB", "LARS"]


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
