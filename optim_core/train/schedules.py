r"""Learning-rate schedules: pure functions of the step.

The convention, once: a schedule is a callable ``schedule(base_lr, step) -> lr``.
``base_lr`` is the optimizer group's learning rate when training starts and
``step`` the number of optimizer steps already taken (0 for the first step).
:func:`optim_core.fit` sets every group's ``"lr"`` to ``schedule(base_lr, step)``
before every step, with ``step`` the optimizer's own step count, so resuming
from a checkpoint restores the schedule by restoring the optimizer's step; no
other state is kept. Steps are optimizer steps, not epochs: one epoch is
``ceil(n_samples / batch_size)`` steps.

Any function of ``(base_lr, step)`` works as a schedule. The ones here are small
immutable objects (they print their settings and compare equal by value):

==================  ==========================================================
:func:`constant`    :math:`\gamma_t = \gamma`
:func:`step_decay`  :math:`\gamma\,g^{\lfloor t/s\rfloor}` (``torch``'s StepLR)
:func:`exponential` :math:`\gamma\,g^t`, the founding article's ``alpha *= decay``
:func:`cosine`      cosine annealing to ``min_lr`` over ``total_steps``
                    (Loshchilov & Hutter, SGDR, ICLR 2017)
:func:`warmup`      linear warmup in front of any schedule (Goyal et al., 2017)
:func:`one_cycle`   the 1cycle policy (Smith & Topin, 2018), as ``torch``'s
                    OneCycleLR
==================  ==========================================================

:class:`ReduceOnPlateau` is the one stateful exception: it lowers the learning
rate when a monitored quantity stops improving, which depends on the history of
that quantity, not on the step. It is also a callback (``fit`` calls its
:meth:`~ReduceOnPlateau.on_epoch_end`), and its :meth:`~ReduceOnPlateau.state_dict`
is what a checkpoint has to keep.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .. import _checks as checks

__all__ = [
    "Schedule",
    "Constant",
    "StepDecay",
    "Exponential",
    "Cosine",
    "Warmup",
    "OneCycle",
    "ReduceOnPlateau",
    "constant",
    "step_decay",
    "exponential",
    "cosine",
    "warmup",
    "one_cycle",
    "SCHEDULES",
]

#: ``schedule(base_lr, step) -> lr``.
Schedule = Callable[[float, int], float]


def _check_step(step: Any) -> int:
    # Called at every step: the common case (a Python int >= 0) costs one type test.
    if type(step) is int and step >= 0:
        return step
    return checks.integer("step", step, minimum=0)


def _check_positive_int(name: str, value: Any) -> None:
    checks.integer(name, value, minimum=1)


def _check_number(name: str, value: Any, *, low: float = 0.0, high: float = math.inf,
                  low_open: bool = False, high_open: bool = False) -> None:
    checks.number(name, value, low=low, high=high, low_open=low_open, high_open=high_open)


@dataclass(frozen=True)
class Constant:
    """The base learning rate at every step."""

    def __call__(self, base_lr: float, step: int) -> float:
        _check_step(step)
        return base_lr


@dataclass(frozen=True)
class StepDecay:
    r""":math:`\gamma_t = \gamma\, g^{\lfloor t / s \rfloor}`: times ``gamma`` per ``step_size``."""

    step_size: int
    gamma: float = 0.1

    def __post_init__(self) -> None:
        _check_positive_int("step_size", self.step_size)
        _check_number("gamma", self.gamma, high=1.0)

    def __call__(self, base_lr: float, step: int) -> float:
        return base_lr * self.gamma ** (_check_step(step) // self.step_size)


@dataclass(frozen=True)
class Exponential:
    r""":math:`\gamma_t = \gamma\, g^t`: multiply by ``gamma`` after every step.

    This is the founding article's step-size decay (``alpha *= alpha_decay``
    after every iteration, with ``alpha_decay = 0.9``).
    """

    gamma: float

    def __post_init__(self) -> None:
        _check_number("gamma", self.gamma, high=1.0)

    def __call__(self, base_lr: float, step: int) -> float:
        return base_lr * self.gamma ** _check_step(step)


@dataclass(frozen=True)
class Cosine:
    r"""Cosine annealing from the base rate to ``min_lr`` over ``total_steps``, then ``min_lr``.

    .. math::

        \gamma_t = \gamma_{\min} + \tfrac12(\gamma - \gamma_{\min})
                   \bigl(1 + \cos(\pi\, t / T)\bigr), \qquad 0 \le t \le T

    The closed form of ``torch``'s CosineAnnealingLR (Loshchilov & Hutter,
    "SGDR: Stochastic Gradient Descent with Warm Restarts", ICLR 2017), without
    restarts.
    """

    total_steps: int
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        _check_positive_int("total_steps", self.total_steps)
        _check_number("min_lr", self.min_lr)

    def __call__(self, base_lr: float, step: int) -> float:
        t = min(_check_step(step), self.total_steps)
        return self.min_lr + 0.5 * (base_lr - self.min_lr) * (
            1.0 + math.cos(math.pi * t / self.total_steps))


@dataclass(frozen=True)
class Warmup:
    r"""Linear warmup over ``warmup_steps`` steps, then ``schedule`` started afresh.

    .. math::

        \gamma_t = \begin{cases}
            s(\gamma, 0)\,(t+1)/W & t < W \\
            s(\gamma, t - W) & t \ge W
        \end{cases}

    so the rate climbs to the inner schedule's first value at step ``W - 1``
    and the inner schedule (a cosine's ``total_steps``, say) counts the steps
    after the warmup. Goyal et al., "Accurate, Large Minibatch SGD: Training
    ImageNet in 1 Hour", 2017.
    """

    schedule: Schedule
    warmup_steps: int

    def __post_init__(self) -> None:
        if not callable(self.schedule):
            raise TypeError(f"schedule must be callable (base_lr, step) -> lr, "
                            f"got {self.schedule!r}")
        _check_positive_int("warmup_steps", self.warmup_steps)

    def __call__(self, base_lr: float, step: int) -> float:
        step = _check_step(step)
        if step < self.warmup_steps:
            return self.schedule(base_lr, 0) * (step + 1) / self.warmup_steps
        return self.schedule(base_lr, step - self.warmup_steps)


@dataclass(frozen=True)
class OneCycle:
    r"""The 1cycle policy: up from ``max_lr / div_factor`` to ``max_lr``, then down to
    ``max_lr / (div_factor * final_div_factor)``.

    The rise takes the first ``pct_start`` of ``total_steps``; both phases follow a
    half cosine (or a line with ``anneal="linear"``). The values are those of
    ``torch.optim.lr_scheduler.OneCycleLR`` (two phases) step for step. Smith &
    Topin, "Super-Convergence: Very Fast Training of Neural Networks Using Large
    Learning Rates", 2018. Past ``total_steps`` the rate stays at its final value.

    ``max_lr=None`` takes the base learning rate as the peak.
    """

    total_steps: int
    max_lr: float | None = None
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"

    def __post_init__(self) -> None:
        _check_positive_int("total_steps", self.total_steps)
        if self.max_lr is not None:
            _check_number("max_lr", self.max_lr)
        _check_number("pct_start", self.pct_start, high=1.0, low_open=True, high_open=True)
        _check_number("div_factor", self.div_factor, low_open=True)
        _check_number("final_div_factor", self.final_div_factor, low_open=True)
        checks.choice("anneal", self.anneal, ("cos", "linear"))
        if float(self.pct_start * self.total_steps) - 1 <= 0 or \
                self.total_steps - 1 <= float(self.pct_start * self.total_steps) - 1:
            raise ValueError(f"total_steps={self.total_steps} with pct_start={self.pct_start} "
                             "leaves a phase with no steps")

    def _interpolate(self, start: float, end: float, pct: float) -> float:
        if self.anneal == "cos":
            return end + (start - end) / 2.0 * (math.cos(math.pi * pct) + 1)
        return (end - start) * pct + start

    def __call__(self, base_lr: float, step: int) -> float:
        step = min(_check_step(step), self.total_steps - 1)
        peak = base_lr if self.max_lr is None else self.max_lr
        initial = peak / self.div_factor
        final = initial / self.final_div_factor
        rise_end = float(self.pct_start * self.total_steps) - 1
        if step <= rise_end:
            return self._interpolate(initial, peak, step / rise_end)
        return self._interpolate(peak, final,
                                 (step - rise_end) / (self.total_steps - 1 - rise_end))


def constant() -> Constant:
    """The base learning rate throughout (the same as no schedule)."""
    return Constant()


def step_decay(step_size: int, gamma: float = 0.1) -> StepDecay:
    """Multiply the rate by ``gamma`` every ``step_size`` steps; see :class:`StepDecay`."""
    return StepDecay(step_size, gamma)


def exponential(gamma: float) -> Exponential:
    """Multiply the rate by ``gamma`` every step (the article's decay); see :class:`Exponential`."""
    return Exponential(gamma)


def cosine(total_steps: int, min_lr: float = 0.0) -> Cosine:
    """Cosine annealing to ``min_lr`` over ``total_steps``; see :class:`Cosine`."""
    return Cosine(total_steps, min_lr)


def warmup(schedule: Schedule, warmup_steps: int) -> Warmup:
    """Linear warmup over ``warmup_steps`` in front of ``schedule``; see :class:`Warmup`."""
    return Warmup(schedule, warmup_steps)


def one_cycle(total_steps: int, max_lr: float | None = None, *, pct_start: float = 0.3,
              div_factor: float = 25.0, final_div_factor: float = 1e4,
              anneal: str = "cos") -> OneCycle:
    """The 1cycle policy over ``total_steps``; see :class:`OneCycle`."""
    return OneCycle(total_steps, max_lr, pct_start, div_factor, final_div_factor, anneal)


class ReduceOnPlateau:
    r"""Multiply the learning rate by ``factor`` when ``monitor`` stops improving.

    The stateful exception among the schedules: it is a schedule (the rate is
    ``max(schedule(base_lr, step) * scale, min_lr)`` once reduced, where
    ``scale`` is the product of the reductions so far) and a callback whose
    :meth:`on_epoch_end` watches ``monitor`` once per epoch. The decision is
    ``torch.optim.lr_scheduler.ReduceOnPlateau``'s: a value is an improvement when
    it beats the best so far by more than ``threshold`` (relative, or absolute
    with ``threshold_mode="abs"``); after more than ``patience`` epochs without
    one, the rate is reduced and ``cooldown`` epochs pass before counting again.

    Parameters
    ----------
    factor : float in (0, 1)
    patience : int >= 0
    monitor : str
        A key of the epoch logs: "val_loss", "train_loss", "val_metric", "train_metric".
    mode : {"auto", "min", "max"}
        "auto" minimizes losses and maximizes metrics.
    threshold : float >= 0
    threshold_mode : {"rel", "abs"}
    cooldown : int >= 0
    min_lr : float >= 0
    schedule : schedule, optional
        What is scaled; the base rate when omitted.

    Notes
    -----
    :meth:`state_dict` / :meth:`load_state_dict` hold everything a checkpoint
    must keep (the scale, the best value and the counters).
    """

    def __init__(self, factor: float = 0.1, patience: int = 10, *, monitor: str = "val_loss",
                 mode: str = "auto", threshold: float = 1e-4, threshold_mode: str = "rel",
                 cooldown: int = 0, min_lr: float = 0.0, schedule: Schedule | None = None) -> None:
        factor = checks.number("factor", factor, low=0.0, low_open=True, high=1.0,
                               high_open=True)
        patience = checks.integer("patience", patience, minimum=0)
        cooldown = checks.integer("cooldown", cooldown, minimum=0)
        threshold = checks.number("threshold", threshold, low=0.0)
        min_lr = checks.number("min_lr", min_lr, low=0.0)
        checks.choice("threshold_mode", threshold_mode, ("rel", "abs"))
        checks.choice("mode", mode, ("auto", "min", "max"))
        if not isinstance(monitor, str):
            raise checks.WrongTypeError(f"monitor must be a string, got {monitor!r:.80}")
        if schedule is not None and not callable(schedule):
            raise TypeError(f"schedule must be callable (base_lr, step) -> lr, got {schedule!r}")
        self.factor = factor
        self.patience = patience
        self.monitor = monitor
        self.mode = ("min" if "loss" in monitor else "max") if mode == "auto" else mode
        self.threshold = threshold
        self.threshold_mode = threshold_mode
        self.cooldown = cooldown
        self.min_lr = min_lr
        self.schedule = schedule if schedule is not None else Constant()
        self.reset()

    def reset(self) -> None:
        """Forget the history: full rate, no best value."""
        self.scale = 1.0
        self.best: float | None = None
        self.num_bad_epochs = 0
        self.cooldown_counter = 0

    def __call__(self, base_lr: float, step: int) -> float:
        lr = self.schedule(base_lr, step) * self.scale
        return max(lr, self.min_lr) if self.scale < 1 else lr

    def _is_better(self, value: float) -> bool:
        if self.best is None:
            return not math.isnan(value)
        if self.mode == "min":
            bound = self.best * (1 - self.threshold) if self.threshold_mode == "rel" \
                else self.best - self.threshold
            return value < bound
        bound = self.best * (1 + self.threshold) if self.threshold_mode == "rel" \
            else self.best + self.threshold
        return value > bound

    def on_epoch_end(self, epoch: int, logs: dict[str, Any], model: Any = None) -> None:
        """Record this epoch's ``logs[monitor]``; reduce the rate after a plateau."""
        value = logs.get(self.monitor)
        if value is None:
            logged = sorted(k for k, v in logs.items() if v is not None)
            raise ValueError(f"ReduceOnPlateau monitors {self.monitor!r}, which this run "
                             f"does not log (logs have {logged})")
        value = float(value)
        if self._is_better(value):
            self.best = value
            self.num_bad_epochs = 0
        else:
            self.num_bad_epochs += 1
        if self.cooldown_counter > 0:
            self.cooldown_counter -= 1
            self.num_bad_epochs = 0
        if self.num_bad_epochs > self.patience:
            self.scale *= self.factor
            self.cooldown_counter = self.cooldown
            self.num_bad_epochs = 0
        return None

    def state_dict(self) -> dict[str, Any]:
        """The mutable state, as plain Python values."""
        return {"scale": self.scale, "best": self.best, "num_bad_epochs": self.num_bad_epochs,
                "cooldown_counter": self.cooldown_counter}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output."""
        if not isinstance(state, dict):
            raise TypeError(f"ReduceOnPlateau state must be a dict, got {type(state).__name__}")
        missing = {"scale", "best", "num_bad_epochs", "cooldown_counter"} - set(state)
        if missing:
            raise ValueError(f"ReduceOnPlateau state lacks {sorted(missing)}")
        # Everything checked before anything is written.
        scale = checks.number("scale", state["scale"], low=0.0)
        best = None if state["best"] is None else checks.number("best", state["best"])
        bad_epochs = checks.integer("num_bad_epochs", state["num_bad_epochs"], minimum=0)
        cooldown = checks.integer("cooldown_counter", state["cooldown_counter"], minimum=0)
        self.scale, self.best = scale, best
        self.num_bad_epochs, self.cooldown_counter = bad_epochs, cooldown

    def __repr__(self) -> str:
        return (f"ReduceOnPlateau(factor={self.factor}, patience={self.patience}, "
                f"monitor={self.monitor!r}, mode={self.mode!r}, scale={self.scale})")


#: Schedule factories by name (for command lines and configuration files).
SCHEDULES: dict[str, Callable[..., Any]] = {
    "constant": constant,
    "step": step_decay,
    "exponential": exponential,
    "cosine": cosine,
    "warmup": warmup,
    "one_cycle": one_cycle,
    "reduce_on_plateau": ReduceOnPlateau,
}
