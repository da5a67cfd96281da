"""Callbacks for :func:`optim_core.fit`.

A callback is any object with some of these methods; ``fit`` calls those it has:

``on_train_begin(model, history)``
    before the first epoch;
``on_epoch_end(epoch, logs, model) -> bool | None``
    after each epoch (``epoch`` counts from 1; ``logs`` is the epoch's entry of
    :attr:`History.epochs <optim_core.History.epochs>`); returning True stops
    training after this epoch;
``on_train_end(model, history)``
    after the last epoch, stopped early or not.

:class:`EarlyStopping` is the one shipped here;
:class:`~optim_core.schedules.ReduceOnPlateau` is a schedule that is also a callback.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .. import _checks as checks
from .. import _namespace as ns
from .regularization import _store

__all__ = ["Callback", "EarlyStopping"]


class Callback:
    """Optional base class: every hook does nothing."""

    def on_train_begin(self, model: Any, history: Any) -> None:
        return None

    def on_epoch_end(self, epoch: int, logs: dict[str, Any], model: Any) -> bool | None:
        return None

    def on_train_end(self, model: Any, history: Any) -> None:
        return None


class EarlyStopping(Callback):
    """Stop when ``monitor`` has not improved for ``patience`` epochs; restore the best weights.

    Parameters
    ----------
    monitor : str
        A key of the epoch logs: "val_loss" (the default; ``fit`` then needs
        ``validation_data``), "val_metric", "train_loss" or "train_metric".
    patience : int >= 1
        Epochs without improvement before stopping.
    min_delta : float >= 0
        An improvement must beat the best value by more than this.
    restore_best : bool
        At the end of training, put back the parameters of the best epoch
        (written into the model's arrays in place, so an optimizer built on them
        stays attached). Keras calls it ``restore_best_weights``.
    mode : {"auto", "min", "max"}
        "auto" minimizes losses and maximizes metrics.

    Attributes
    ----------
    best : float or None
        The best monitored value so far.
    best_epoch : int or None
        Its epoch (from 1).
    stopped_epoch : int or None
        The epoch after which training stopped, if it did.
    """

    def __init__(self, monitor: str = "val_loss", patience: int = 5, min_delta: float = 0.0,
                 restore_best: bool = True, *, mode: str = "auto") -> None:
        if not isinstance(monitor, str):
            raise checks.WrongTypeError(f"monitor must be a string, got {monitor!r:.80}")
        self.patience = checks.integer("patience", patience, minimum=1)
        self.min_delta = checks.number("min_delta", min_delta, low=0.0)
        self.restore_best = checks.boolean("restore_best", restore_best)
        checks.choice("mode", mode, ("auto", "min", "max"))
        self.monitor = monitor
        self.mode = ("min" if "loss" in monitor else "max") if mode == "auto" else mode
        self._reset()

    def _reset(self) -> None:
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.stopped_epoch: int | None = None
        self.wait = 0
        self._best_params: dict[str, Any] | None = None
        self._last_epoch: int | None = None

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def on_train_begin(self, model: Any, history: Any) -> None:
        self._reset()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any], model: Any) -> bool:
        value = logs.get(self.monitor)
        if value is None:
            raise ValueError(f"EarlyStopping monitors {self.monitor!r}, which this run does "
                             "not log (pass validation_data to fit to monitor val_*)")
        self._last_epoch = epoch
        if self._improved(float(value)):
            self.best, self.best_epoch, self.wait = float(value), epoch, 0
            if self.restore_best:
                self._best_params = _copy_params(model.params)
            return False
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped_epoch = epoch
            return True
        return False

    def on_train_end(self, model: Any, history: Any) -> None:
        if self.restore_best and self._best_params is not None \
                and self.best_epoch != self._last_epoch:
            params = dict(model.params)
            for name, saved in self._best_params.items():
                target = params[name]
                if type(saved) is not type(target):  # host copies from a checkpoint
                    saved = ns.from_numpy(ns.namespace_of(target), saved, like=target)
                params[name] = _store(target, saved)
            model.params = params
        if history is not None and self.best_epoch is not None:
            history.best_epoch = self.best_epoch

    def state_dict(self) -> dict[str, Any]:
        """Counters, best value and (as host NumPy arrays) the best parameters, for checkpoints."""
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait,
                "stopped_epoch": self.stopped_epoch, "last_epoch": self._last_epoch,
                "best_params": None if self._best_params is None else
                {name: ns.to_numpy(p) for name, p in self._best_params.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output (best parameters stay on the host until restored)."""
        if not isinstance(state, dict):
            raise TypeError(f"EarlyStopping state must be a dict, got {type(state).__name__}")
        missing = {"best", "best_epoch", "wait", "stopped_epoch", "last_epoch",
                   "best_params"} - set(state)
        if missing:
            raise ValueError(f"EarlyStopping state lacks {sorted(missing)}")

        def epoch_or_none(key: str) -> int | None:
            value = state[key]
            return None if value is None else checks.integer(key, value, minimum=1)

        # Everything checked and converted before anything is written.
        best = None if state["best"] is None else checks.number("best", state["best"])
        best_epoch, stopped_epoch = epoch_or_none("best_epoch"), epoch_or_none("stopped_epoch")
        last_epoch = epoch_or_none("last_epoch")
        wait = checks.integer("wait", state["wait"], minimum=0)
        best_params = state["best_params"]
        if best_params is not None:
            if not isinstance(best_params, dict) or not all(
                    isinstance(value, np.ndarray) for value in best_params.values()):
                raise TypeError("EarlyStopping best_params must be a dict of NumPy arrays")
            best_params = {name: np.array(value, copy=True) for name, value in best_params.items()}
        self.best, self.best_epoch, self.wait = best, best_epoch, wait
        self.stopped_epoch, self._last_epoch = stopped_epoch, last_epoch
        self._best_params = best_params

    def __repr__(self) -> str:
        return (f"EarlyStopping(monitor={self.monitor!r}, patience={self.patience}, "
                f"min_delta={self.min_delta}, restore_best={self.restore_best})")


def _copy_params(params: dict[str, Any]) -> dict[str, Any]:
    """Copies on the parameters' own device (no host round trip)."""
    out = {}
    for name, p in params.items():
        xp = ns.namespace_of(p)
        out[name] = xp.asarray(p, copy=True)
    return out
