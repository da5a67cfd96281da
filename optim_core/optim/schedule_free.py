r"""Schedule-Free SGD and AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024).

Schedule-free methods replace a learning rate schedule by an average of iterates. They
keep three sequences: :math:`z` (the base optimizer's iterates), :math:`x` (their
weighted average, the point to evaluate and ship) and :math:`y` (the point where the
gradient is taken), related by

.. math::

    y_t = (1-\beta)\,z_t + \beta\,x_t, \qquad
    x_{t+1} = (1-c_{t+1})\,x_t + c_{t+1} z_{t+1}.

As in the ``schedulefree`` package, the parameter array holds :math:`y` while
training and :math:`x` is never stored: :meth:`ScheduleFreeOptimizer.eval` moves the
parameters to :math:`x` (to evaluate or save the model), :meth:`~ScheduleFreeOptimizer.train`
back to :math:`y`, and :meth:`~ScheduleFreeOptimizer.step` refuses in eval mode.

Each update is one rule of the rule language (in :mod:`.rules_schedule_free`), so it
has the generic path and the fused kernels; so has the switch between :math:`y` and
:math:`x` (``schedule_free_switch``, one ``lerp``). The host scalars of a step (the
warmup learning rate, ``lr_max``, the averaging weight :math:`c_{t+1}` and
``weight_sum``) are derived in :meth:`ScheduleFreeOptimizer.scalars` and kept in the
group state.

Names
-----
Hyperparameters are named as in ``schedulefree`` 1.4.1's ``SGDScheduleFree`` and
``AdamWScheduleFree``, with their defaults: ``lr``, ``momentum`` (SGD) or ``betas``
(AdamW), ``eps``, ``weight_decay``, ``warmup_steps``, ``r``, ``weight_lr_power``
(``foreach`` is theirs only: every implementation here is one pass per tensor). What
``schedulefree`` keeps in each param group is here as follows:

* ``group['k']``: ``group_state[i]['step']``, the steps taken (``k`` before a step);
* ``group['lr_max']``, ``group['weight_sum']``: ``group_state[i]['lr_max']``,
  ``group_state[i]['weight_sum']``;
* ``group['train_mode']``: :attr:`ScheduleFreeOptimizer.train_mode`, one for all
  groups (``schedulefree`` reads group 0's), saved as ``state_dict()['train_mode']``;
* ``group['scheduled_lr']``: :meth:`ScheduleFreeOptimizer.scheduled_lr`;
* ``state['z']``, ``state['exp_avg_sq']`` (AdamW): ``state[i][j]['z']``,
  ``state[i][j]['exp_avg_sq']``.

One difference: ``schedulefree``'s optimizers are made in eval mode and refuse to
step until ``train()`` is called; these are made in train mode. Before the first step
the two sequences coincide (there is no :math:`z` yet, and ``train()`` moves nothing),
so the only effect is that the first ``train()`` call is not needed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from .. import _checks
from ..backends._generic import TensorMismatch
from . import scalar_math
from .algorithms import _doc
from .base import Optimizer
from .param_group import Hyperparameter
from .rules_schedule_free import schedule_free_adamw, schedule_free_sgd, schedule_free_switch

__all__ = ["ScheduleFreeSGD", "ScheduleFreeAdamW", "ScheduleFreeOptimizer"]


def _steps(name: str, value: Any) -> int:
    return _checks.integer(name, value, minimum=0)


def _real(name: str, value: Any) -> float:
    return _checks.number(name, value)


def _nonnegative(name: str, value: Any) -> float:
    return _checks.number(name, value, low=0)


def _open_fraction(name: str, value: Any) -> float:
    return _checks.number(name, value, low=0, high=1, low_open=True, high_open=True)


def _betas(name: str, value: Any) -> tuple[float, float]:
    beta1, beta2 = _checks.number_pair(name, value, low=0, high=1, high_open=True)
    _open_fraction(f"{name}[0]", beta1)
    return beta1, beta2


_SCHEDULE_CHECKS = {
    "warmup_steps": Hyperparameter(_steps),
    "r": Hyperparameter(_real),
    # >= 0: lr_max is 0 while lr is, and 0 ** -p is a division by zero.
    "weight_lr_power": Hyperparameter(_nonnegative),
}


class ScheduleFreeOptimizer(Optimizer):
    """What Schedule-Free SGD and AdamW share: the averaging weights, the warmup and the
    switch between the training point :math:`y` and the average :math:`x`.

    Attributes
    ----------
    train_mode : bool
        Whether the parameters hold :math:`y` (train mode, where :meth:`step` runs) or
        :math:`x` (eval mode). Set by :meth:`train` and :meth:`eval`.
    """

    def __init__(self, params: Any, defaults: dict[str, Any], **options: Any) -> None:
        super().__init__(params, defaults, **options)
        self._train_mode = True

    # ----------------------------------------------------------------- per optimizer
    def interpolation(self, group: Mapping[str, Any]) -> float:
        r"""The interpolation :math:`\beta` between :math:`z` and :math:`x` (``momentum``,
        or AdamW's ``betas[0]``)."""
        raise NotImplementedError

    def _initial_group_state(self) -> dict[str, Any]:
        return {"step": 0, "lr_max": -1.0, "weight_sum": 0.0}

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        # schedulefree's step, with k = the steps taken before this one.
        # scalar_math, not max()/if: the functional API traces this with 0-d arrays.
        k = group_state["step"] - 1
        lr = self.scheduled_lr(group, k)
        lr_max = group_state["lr_max"] = scalar_math.maximum(lr, group_state["lr_max"])
        weight = ((k + 1) ** group["r"]) * (lr_max ** group["weight_lr_power"])
        weight_sum = group_state["weight_sum"] = group_state["weight_sum"] + weight
        nonzero = weight_sum != 0
        ckp1 = scalar_math.where(nonzero, weight / scalar_math.where(nonzero, weight_sum, 1.0),
                                 0.0)
        return {"scheduled_lr": lr, "ckp1": ckp1,
                "y_step": lr * (self.interpolation(group) * (1 - ckp1) - 1)}

    # ----------------------------------------------------------------- public API
    @property
    def train_mode(self) -> bool:
        return self._train_mode

    def scheduled_lr(self, group: Mapping[str, Any], k: int) -> float:
        """The learning rate of step ``k + 1`` (``k`` steps taken): ``lr`` times the linear
        warmup ``(k + 1) / warmup_steps`` during the first ``warmup_steps`` steps."""
        warmup = group["warmup_steps"]
        sched = scalar_math.where(k < warmup, (k + 1) / scalar_math.maximum(warmup, 1), 1.0)
        return group["lr"] * sched

    def train(self) -> None:
        r"""Put the parameters at the training point :math:`y = (1-\beta) z + \beta x`
        (nothing to do in train mode)."""
        with self._lock:
            if not self._train_mode:
                self._switch(lambda beta: 1 - beta)
                self._train_mode = True

    def eval(self) -> None:
        r"""Put the parameters at the average :math:`x` (to evaluate or save the model);
        :meth:`step` refuses until :meth:`train` is called."""
        with self._lock:
            if self._train_mode:
                self._switch(lambda beta: 1 - 1 / beta)
                self._train_mode = False

    def state_dict(self) -> dict[str, Any]:
        """The base class's snapshot and ``train_mode``."""
        state = super().state_dict()
        with self._lock:
            state["train_mode"] = self._train_mode
        return state

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`, its mode included (the parameters are the
        caller's: restore them as they were saved, in that mode)."""
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        if "train_mode" not in state_dict:
            raise ValueError(f"a {type(self).__name__} state_dict holds 'train_mode'")
        mode = _checks.boolean("state_dict['train_mode']", state_dict["train_mode"])
        with self._lock:
            self._load_state_dict({k: v for k, v in state_dict.items() if k != "train_mode"})
            self._train_mode = mode

    # ----------------------------------------------------------------- internals
    def _step(self, grads: Any) -> Any:
        if not self._train_mode:
            raise RuntimeError(f"{type(self).__name__} is in eval mode: its parameters hold "
                               "the average x, not the training point y. Call .train() "
                               "before step() (and .eval() before evaluating or saving)")
        return super()._step(grads)

    def _switch(self, weight_of: Any) -> None:
        """Move every stepped parameter with ``lerp(param, z, weight_of(beta))``: checked
        for every group first, then written."""
        self._check_group_structure()
        flat, xp = self._flat, self._xp
        runs = []
        for index, group in enumerate(self.param_groups):
            states = self.state[index]
            if not states or "z" not in states[0]:
                continue  # not stepped yet: y, x and z coincide
            scalars = {"weight": weight_of(self.interpolation(group))}
            if flat is not None:
                params, _, step_states = flat.buffers(index)
            else:
                params, step_states = group["params"], states
            try:
                ready = self.implementation.prepare(schedule_free_switch, xp, params, params,
                                                    step_states, scalars)
            except TensorMismatch as exc:
                raise ValueError(f"parameter {group['names'][exc.index]!r}: {exc.detail}; "
                                 "nothing was moved") from None
            runs.append((index, group, params, ready))
        for index, group, params, ready in runs:
            out = ready.run()
            if flat is None and any(o is not p for o, p in zip(out, params, strict=True)):
                group._store_params(out)  # new arrays (immutable libraries)
                self._known[index] = list(out)


_SCHEDULE_DOC = """
    warmup_steps : int, default 0
        Linear warmup of the learning rate over this many steps.
    r : float, default 0
        Polynomial weighting: step :math:`t`'s weight in the average is
        :math:`t^r\\,\\gamma_{\\max}^{p}`.
    weight_lr_power : float, default 2
        :math:`p`, the power of the largest learning rate so far in the weights (0: no
        weighting by the warmup)."""


def _schedule_doc(cls: type) -> type:
    cls.__doc__ = cls.__doc__.replace("    {schedule}", _SCHEDULE_DOC.strip("\n"))
    return _doc(cls)


@_schedule_doc
class ScheduleFreeSGD(ScheduleFreeOptimizer):
    r"""Schedule-Free SGD (Defazio et al., "The Road Less Scheduled", NeurIPS 2024).

    .. math::

        \gamma_t &= \gamma \min(1, t / T_w), \qquad
        c_{t} = \frac{t^r \gamma_{\max,t}^p}{\sum_{i\le t} i^r \gamma_{\max,i}^p} \\
        g_t &= \nabla f(y_{t-1}) + \lambda y_{t-1} \\
        y_t &= (1 - c_t)\,y_{t-1} + c_t z_{t-1} + \gamma_t\,(\beta(1-c_t) - 1)\, g_t \\
        z_t &= z_{t-1} - \gamma_t g_t

    with :math:`z_0 = y_0` the initial parameter. The parameter holds :math:`y` in train
    mode; :meth:`eval` moves it to :math:`x = (y - (1-\beta) z)/\beta`, :meth:`train`
    back. Same as ``schedulefree.SGDScheduleFree`` (1.4.1); see
    :mod:`optim_core.optim.schedule_free` for the mapping of its names.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 1.0
    momentum : float, default 0.9
        :math:`\beta`, in (0, 1).
    weight_decay : float, default 0
        L2 penalty :math:`\lambda`, taken at :math:`y`.
    {schedule}
    {common}
    """

    cli_name = "schedulefreesgd"
    weight_decay_kind = "l2"

    rule = schedule_free_sgd
    hyperparameter_checks: ClassVar[Mapping[str, Hyperparameter]] = {
        **_SCHEDULE_CHECKS, "momentum": Hyperparameter(_open_fraction)}

    def __init__(self, params: Any, lr: float = 1.0, momentum: float = 0.9,
                 weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r,
                                      weight_lr_power=weight_lr_power), **options)

    def interpolation(self, group: Mapping[str, Any]) -> float:
        return group["momentum"]


@_schedule_doc
class ScheduleFreeAdamW(ScheduleFreeOptimizer):
    r"""Schedule-Free AdamW (Defazio et al., "The Road Less Scheduled", NeurIPS 2024).

    .. math::

        v_t &= \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \qquad
        \hat g_t = \frac{g_t}{\sqrt{v_t / (1-\beta_2^t)} + \epsilon} + \lambda y_{t-1} \\
        y_t &= (1 - c_t)\,y_{t-1} + c_t z_{t-1} + \gamma_t\,(\beta_1(1-c_t) - 1)\,\hat g_t \\
        z_t &= z_{t-1} - \gamma_t \hat g_t

    with :math:`g_t = \nabla f(y_{t-1})`, :math:`z_0 = y_0`, and :math:`\gamma_t`,
    :math:`c_t` as in :class:`ScheduleFreeSGD`. The weight decay is decoupled from the
    normalization (added after it, at :math:`y`). Same as
    ``schedulefree.AdamWScheduleFree`` (1.4.1); see :mod:`optim_core.optim.schedule_free`
    for the mapping of its names.

    Parameters
    ----------
    params : list or dict of arrays, or list of param groups
    lr : float, default 0.0025
    betas : (float, float), default (0.9, 0.999)
        :math:`\beta_1` in (0, 1), the interpolation between :math:`z` and :math:`x`;
        :math:`\beta_2` in [0, 1).
    eps : float, default 1e-8
    weight_decay : float, default 0
        :math:`\lambda`.
    {schedule}
    {common}
    """

    cli_name = "schedulefreeadamw"
    weight_decay_kind = "decoupled"

    rule = schedule_free_adamw
    hyperparameter_checks: ClassVar[Mapping[str, Hyperparameter]] = {
        **_SCHEDULE_CHECKS, "betas": Hyperparameter(_betas, ("beta1", "beta2"))}

    def __init__(self, params: Any, lr: float = 0.0025,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0, warmup_steps: int = 0, r: float = 0.0,
                 weight_lr_power: float = 2.0, **options: Any) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      warmup_steps=warmup_steps, r=r,
                                      weight_lr_power=weight_lr_power), **options)

    def interpolation(self, group: Mapping[str, Any]) -> float:
        return group["betas"][0]

    def scalars(self, group: Mapping[str, Any], group_state: dict[str, Any]) -> dict[str, Any]:
        values = super().scalars(group, group_state)
        values["bias_correction2"] = 1 - group["betas"][1] ** group_state["step"]
        return values
