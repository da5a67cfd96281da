r"""Training: :func:`fit` runs an optimizer over mini-batches and records a :class:`History`.

``fit`` is a short sequence of named steps:

1. :func:`_checked_run`: every argument checked, the data's kind decided once (a data
   adapter of :mod:`optim_core.train.data`), before anything changes;
2. :func:`_read_checkpoint`: with ``resume``, the whole checkpoint checked against the
   model, the callbacks and the schedule, still before anything changes;
3. :func:`_set_up`: the parameters created (or taken), the optimizer built (or taken),
   the checkpoint restored; a failure there leaves model, optimizer and callbacks as
   they were;
4. :func:`_train`: the epochs, each step a chain of gradient transforms
   (:func:`optim_core.train.pipeline.training_step`).

Everything stays on the data's array library and device: parameters are created
there, batches are gathered there, and the only host transfers per epoch are a few
scalars (the losses and metrics of the epoch). Runs are deterministic for a given
seed: the initial parameters, each epoch's order and each step's dropout masks are
pure functions of ``(seed, epoch)`` and ``(seed, step)``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks as checks
from .. import _namespace as ns
from ..optim import registry as _registry
from ..optim.base import Optimizer
from ..optim.schedule_free import ScheduleFreeOptimizer
from . import data as data_adapters
from .checkpoint import load_checkpoint, save_checkpoint
from .extras import progress_bar
from .metrics import outputs_per_sample, r2
from .models import Model
from .pipeline import TrainedParams, training_step
from .regularization import dropout_key
from .schedules import ReduceOnPlateau
from .threads import BlasThreadChoice, limited_blas

__all__ = ["fit", "History", "OPTIMIZERS", "make_optimizer", "epoch_order"]

#: Optimizer classes by the (lower-case) names :func:`fit` accepts (the optimizers' registry).
OPTIMIZERS = _registry.OPTIMIZERS

# Stream identifiers mixed into the seed, so no two uses share random numbers.
_STREAM_ORDER = 1
_STREAM_DROPOUT = 2

_LOG_KEYS = ("epoch", "train_loss", "train_metric", "val_loss", "val_metric", "lr", "time")
_NONFINITE = ("raise", "skip", "propagate")


class History:
    """What :func:`fit` recorded, one entry per epoch.

    Attributes
    ----------
    epochs : list of dict
        Per epoch (counting from 1): ``epoch``; ``train_loss`` and
        ``train_metric``, measured on the epoch's batches as they were trained on,
        from the same forward passes (dropout active, parameters changing along
        the way, penalties not included; as Keras does), so they cost no extra
        pass over the data: the mean loss over the epoch's samples, and the
        accuracy, or the :math:`R^2` of those residuals; ``val_loss`` and ``val_metric`` on
        ``validation_data`` at the end of the epoch (None without it); ``lr``, the
        learning rate of the epoch's last step (first parameter group); ``time``,
        the epoch's wall time in seconds, evaluation included.
    metric_name : str
        What the metric is: "accuracy" or "r2".
    stopped_early : bool
        Whether a callback stopped training before ``epochs``.
    best_epoch : int or None
        The epoch :class:`~optim_core.EarlyStopping` found best when it was used;
        otherwise the epoch of the lowest ``val_loss`` (``train_loss`` without
        validation data).
    seed : int
        The seed the run used (drawn from the operating system when ``fit`` got None),
        so any run can be repeated.
    optimizer : Optimizer or None
        The optimizer that trained the model.
    steps : int
        Optimizer steps taken by the run.
    blas_threads : list of dict
        For each epoch this call ran, in order: how many of its steps ran on each BLAS
        thread count (None when ``fit`` left BLAS alone), as ``blas_threads="auto"``
        chose them, e.g. ``{2: 460, 1: 9}``.
    """

    def __init__(self, metric_name: str = "metric", seed: int | None = None) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.metric_name = metric_name
        self.stopped_early = False
        self.best_epoch: int | None = None
        self.seed = seed
        self.optimizer: Optimizer | None = None
        self.steps = 0
        self.blas_threads: list[int | None] = []

    def _column(self, key: str) -> list[Any]:
        return [entry[key] for entry in self.epochs]

    @property
    def epoch(self) -> list[int]:
        return self._column("epoch")

    @property
    def train_loss(self) -> list[float]:
        return self._column("train_loss")

    @property
    def train_metric(self) -> list[float]:
        return self._column("train_metric")

    @property
    def val_loss(self) -> list[float | None]:
        return self._column("val_loss")

    @property
    def val_metric(self) -> list[float | None]:
        return self._column("val_metric")

    @property
    def lr(self) -> list[float]:
        return self._column("lr")

    @property
    def time(self) -> list[float]:
        return self._column("time")

    def to_dicts(self) -> list[dict[str, Any]]:
        """A copy of :attr:`epochs` (JSON-ready: only Python numbers and None)."""
        return [dict(entry) for entry in self.epochs]

    def _lowest_loss_epoch(self) -> int | None:
        key = "val_loss" if self.epochs and self.epochs[0]["val_loss"] is not None \
            else "train_loss"
        candidates = [(e[key], e["epoch"]) for e in self.epochs
                      if e[key] is not None and not math.isnan(e[key])]
        return min(candidates)[1] if candidates else None

    def __len__(self) -> int:
        return len(self.epochs)

    def __repr__(self) -> str:
        last = self.epochs[-1] if self.epochs else {}
        summary = ", ".join(f"{k}={last[k]:.4g}" for k in _LOG_KEYS[1:5]
                            if last.get(k) is not None)
        return (f"History({len(self.epochs)} epochs, {self.steps} steps"
                f"{', ' + summary if summary else ''}"
                f"{', stopped early' if self.stopped_early else ''})")


def make_optimizer(name: str | type[Optimizer], params: Mapping[str, Any], *,
                   lr: float | None = None, weight_decay: float | None = None,
                   nonfinite: str = "raise", **kwargs: Any) -> Optimizer:
    """Build the optimizer called ``name`` (case-insensitive; see :data:`OPTIMIZERS`), or
    of class ``name`` (any :class:`~optim_core.Optimizer` subclass, registered or not).

    ``lr=None`` keeps the optimizer's default. ``weight_decay`` is decoupled decay,
    passed to optimizers that implement it (AdamW and Lion always, Adam, NAdam and
    RAdam with ``decoupled_weight_decay=True``); for the others it is applied by
    :func:`fit`, so it is not passed here. None keeps the optimizer's default
    (AdamW's 0.01).
    """
    cls = _optimizer_class(name)
    if "weight_decay" in kwargs:
        raise TypeError("give weight_decay as fit's weight_decay (decoupled decay); "
                        "use l2= for an L2 penalty")
    if lr is not None:
        kwargs["lr"] = lr
    if weight_decay:
        if cls.weight_decay_kind == "decoupled":
            kwargs["weight_decay"] = weight_decay
        elif cls.weight_decay_kind == "switchable":
            if kwargs.get("decoupled_weight_decay") is False:
                raise ValueError("weight_decay is decoupled decay; it cannot be combined with "
                                 "decoupled_weight_decay=False (use l2= for an L2 penalty)")
            kwargs["weight_decay"] = weight_decay
            kwargs["decoupled_weight_decay"] = True
    elif weight_decay is not None and cls.weight_decay_kind == "decoupled":
        kwargs["weight_decay"] = 0.0
    return cls(dict(params), nonfinite=nonfinite, **kwargs)


def _optimizer_class(optimizer: str | type[Optimizer]) -> type[Optimizer]:
    """The class an optimizer given by name or by class stands for."""
    if isinstance(optimizer, type) and issubclass(optimizer, Optimizer):
        return optimizer
    return _registry.optimizer_class(optimizer)


def _built_on(optimizer: Optimizer, params: Mapping[str, Any]) -> bool:
    """Whether ``optimizer`` steps ``params``: the same arrays, or equal copies (``flat=True``)."""
    ours = optimizer.params
    if not isinstance(ours, Mapping) or list(ours) != list(params):
        return False
    for name, param in params.items():
        other = ours[name]
        if other is param:
            continue
        if tuple(other.shape) != tuple(param.shape) or other.dtype != param.dtype or \
                ns.namespace_of(other) is not ns.namespace_of(param) or \
                not bool(ns.namespace_of(param).all(other == param)):
            return False
    return True


def _nonnegative(name: str, value: Any) -> float:
    return checks.number(name, value, low=0.0)


def _positive_or_none(name: str, value: Any) -> float | None:
    return None if value is None else checks.number(name, value, low=0.0, low_open=True)


def _resolve_seed(seed: Any) -> int:
    if seed is None:
        return int(np.random.SeedSequence().entropy % (1 << 63))
    return checks.integer("seed", seed, minimum=0)


def _monitored(obj: Any) -> str | None:
    monitor = getattr(obj, "monitor", None)
    return monitor if isinstance(monitor, str) else None


def _epoch_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that orders epoch ``epoch`` (from 1) of a run seeded by ``seed``."""
    return np.random.default_rng([seed, _STREAM_ORDER, epoch])


def epoch_order(seed: int, epoch: int, n_samples: int) -> np.ndarray:
    """The order :func:`fit` visits the samples in, in ``epoch`` (from 1), under ``seed``.

    (In-memory data; Dask data is shuffled chunk by chunk from the same generator, see
    :func:`optim_core.train.dask_data.epoch_order`.)
    """
    return _epoch_rng(seed, epoch).permutation(n_samples)


@dataclass
class _Run:
    """One call's checked arguments: what :func:`_set_up` and :func:`_train` work from."""

    data: Any  # a data adapter (optim_core.train.data)
    validation: Any  # a data adapter, or None
    optimizer: str | type[Optimizer] | Optimizer
    optimizer_kwargs: dict[str, Any]
    lr: float | None
    epochs: int
    batch_size: int | None
    shuffle: bool
    schedule: Callable[[float, int], float] | None
    weight_decay: float | None
    l1: float
    l2: float
    clip_norm: float | None
    clip_value: float | None
    callbacks: list[Any]
    hooks: list[Any]  # the callbacks, then a schedule with on_epoch_end
    seed: int | None
    progress: bool
    nonfinite: str | None
    checkpoint: str | None
    checkpoint_every: int
    resume: bool
    blas_threads: int | str | None

    @property
    def instance(self) -> bool:
        return isinstance(self.optimizer, Optimizer)


def fit(model: Model, X: Any, y: Any, *, optimizer: str | type[Optimizer] | Optimizer = "adam",
        lr: float | None = None, epochs: int = 10, batch_size: int | None = None,
        shuffle: bool = True, validation_data: tuple[Any, Any] | None = None,
        schedule: Callable[[float, int], float] | None = None,
        weight_decay: float | None = None, l1: float = 0.0, l2: float = 0.0,
        clip_norm: float | None = None, clip_value: float | None = None,
        callbacks: Iterable[Any] = (), seed: int | None = None, progress: bool = True,
        nonfinite: str | None = None, checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1, resume: bool = False,
        blas_threads: int | str | None = "auto",
        **optimizer_kwargs: Any) -> History:
    r"""Train ``model`` on ``(X, y)`` with a first-order optimizer.

    Each step takes one batch, computes the model's loss and exact gradient, and
    in this order: adds the L2 penalty's gradient :math:`\lambda_2 W`; clips the
    gradients by value, then by global norm; applies decoupled weight decay
    :math:`W \leftarrow (1-\gamma\lambda) W`; steps the optimizer; applies the L1
    proximal soft threshold by :math:`\gamma\lambda_1` (see
    :mod:`optim_core.regularization`). Penalties and decay touch the weights only,
    never the biases (:attr:`Model.regularized <optim_core.models.Model.regularized>`).

    Parameters
    ----------
    model : Model
        Its parameters are created at the first fit on ``X``'s namespace, device and
        dtype (seeded by ``seed``) when it has none.
    X, y : arrays
        Training data, in one array library and on one device. Classifier labels
        are integers ``0 .. n_classes - 1``. Dask arrays (both) train on a Dask
        cluster with the parameters in memory, in the chunks' library; mini-batches
        are then shuffled chunk by chunk (see :mod:`optim_core.train.dask_data`).
    optimizer : str, Optimizer subclass or Optimizer
        A name from :data:`OPTIMIZERS` (case-insensitive), an optimizer class (one of
        your own needs no ``cli_name``), or an optimizer already built on
        ``model.params`` (a dict, so gradients can be matched by name).
        A schedule-free optimizer (:class:`~optim_core.ScheduleFreeAdamW`,
        :class:`~optim_core.ScheduleFreeSGD`) trains at its point :math:`y` and is
        evaluated at the average :math:`x`, as the ``schedulefree`` package
        prescribes: each epoch starts with ``optimizer.train()`` and ends with
        ``optimizer.eval()``, so ``val_loss``/``val_metric``, the callbacks (early
        stopping and its best weights), the checkpoints and the model ``fit`` returns
        are at :math:`x` (the optimizer is left in eval mode; call ``train()`` to step
        it yourself, or ``fit`` again, which does). ``train_loss`` is measured at
        :math:`y`, where the gradients are taken.
    lr : float, optional
        Base learning rate; None keeps the optimizer's default (or an instance's
        current rate).
    epochs : int
        Passes over the data.
    batch_size : int, optional
        Samples per step; None (or ``>= n_samples``) takes the whole set each step,
        which is plain gradient descent with ``optimizer="gd"``. The last batch of
        an epoch may be shorter; every batch's gradient is its own mean.
    shuffle : bool
        Visit the samples in a new order each epoch (unused for full batches).
    validation_data : (X_val, y_val), optional
        Evaluated after every epoch (``val_loss``, ``val_metric``).
    schedule : callable ``(base_lr, step) -> lr``, optional
        From :mod:`optim_core.schedules`, or any such function; ``step`` is the
        optimizer's step count. Every group's ``"lr"`` is set before every step.
        A schedule with ``on_epoch_end`` (``ReduceOnPlateau``) is also called as a
        callback, after the others.
    weight_decay : float, optional
        Decoupled weight decay :math:`\lambda` (Loshchilov & Hutter, ICLR 2019):
        each step multiplies the weights by :math:`1 - \gamma\lambda` (with the
        current learning rate :math:`\gamma`) before the update. The rule: it is
        handed to the optimizer where the optimizer implements decoupled decay
        (AdamW and Lion; Adam, NAdam and RAdam with
        ``decoupled_weight_decay=True``, set for you), and applied by ``fit``
        for all the others, whose own ``weight_decay`` is an L2 term. None keeps
        the optimizer's default (0, or 0.01 for AdamW). With an optimizer instance
        configure decay on the instance; ``weight_decay`` must then be None or 0.
    l1 : float
        L1 penalty :math:`\lambda_1\lVert W\rVert_1`, applied as a proximal step
        (soft threshold) after each update, which makes small weights exactly zero.
    l2 : float
        L2 penalty :math:`\tfrac{\lambda_2}{2}\lVert W\rVert^2`: adds
        :math:`\lambda_2 W` to the gradient before clipping.
    clip_norm : float, optional
        Scale the gradients so their global 2-norm is at most this (as
        ``torch.nn.utils.clip_grad_norm_``).
    clip_value : float, optional
        Clip each gradient element to ``[-clip_value, clip_value]`` (before ``clip_norm``).
    callbacks : iterable
        Objects with any of ``on_train_begin(model, history)``,
        ``on_epoch_end(epoch, logs, model)`` (True stops training) and
        ``on_train_end(model, history)``; e.g. :class:`~optim_core.EarlyStopping`.
        One with ``step_masks(params)`` (:class:`~optim_core.pruning.MagnitudePruning`)
        also masks every step: the gradients first, then the updated weights and the
        optimizer's state (:mod:`optim_core.train.pipeline`).
    seed : int, optional
        Seeds the initial parameters, the order of the samples and dropout; None
        draws one from the operating system (recorded in :attr:`History.seed`).
    progress : bool
        Show a tqdm progress bar over the epochs (on stderr). tqdm comes with the
        ``[train]`` extra; without it ``progress=True`` raises an ImportError saying so.
    nonfinite : {"raise", "skip", "propagate"}, optional
        The optimizer's policy for NaN or infinite gradients (see
        :class:`~optim_core.Optimizer`); None means "raise" for an optimizer built
        by name and the instance's own policy otherwise. A raised error names
        the epoch and step.
    checkpoint : path, optional
        File to save the run's whole state to (with :func:`~optim_core.save_checkpoint`,
        atomically): the parameters, the optimizer's state, the history, the seed,
        the epoch and step counters, and the state of every callback and schedule
        that has ``state_dict``/``load_state_dict`` (:class:`~optim_core.EarlyStopping`,
        :class:`~optim_core.schedules.ReduceOnPlateau`).
    checkpoint_every : int
        Save after every this many epochs, and after the last one (or the one a
        callback stopped at).
    resume : bool
        Continue from ``checkpoint`` when the file exists (start afresh when it does
        not, so the same call can simply be repeated after a crash). Since the order
        of the samples and the dropout masks are functions of the seed, the epoch
        and the step, the continued run is bit for bit the run that was not
        interrupted (timings aside) when both ran BLAS on the same counts (an
        integer ``blas_threads``; see there). The call must repeat the interrupted one:
        settings that change the trajectory (optimizer, batch size, penalties,
        clipping, seed, data size, model) are compared and a difference raises
        ValueError before anything changes; ``epochs`` may be raised to train on.
        A run that had stopped early is not continued.
    blas_threads : "auto", int or None
        With NumPy arrays (in memory or as the chunks of Dask arrays): the threads of
        the BLAS libraries of the process (NumPy's OpenBLAS, MKL...) while ``fit``
        runs, each library's own count put back when it returns or raises
        (:func:`optim_core.train.threads.limited_blas`; callbacks run under it too).
        ``"auto"`` (the default) measures: each step is timed and runs on one thread or
        on all of them, whichever was faster lately, the other tried again now and then
        (:class:`~optim_core.train.threads.BlasThreadChoice` says how). No count suits
        every machine: on 2 idle cores one epoch of an MLP 784-256-10 at batch 128
        took 0.62 s on 2 BLAS threads and 0.83 s on one; beside a busy process, 3.0 s
        on 2 and 0.83 s on one (a multi-threaded product waits for time slices at every
        barrier). The counts agree to rounding only (BLAS may sum a product in another
        order on another number of threads): ``history.blas_threads`` counts each
        epoch's steps on each, and an integer ``k`` (at most ``k`` threads, every
        step) gives results that do not depend on timing, nor, with 1, on the
        machine's core count. None leaves the libraries as they are.
        Other libraries (torch, CuPy, JAX) are not affected.
    **optimizer_kwargs
        Further hyperparameters for an optimizer given by name (``momentum=0.9``,
        ``betas=(0.9, 0.99)``, ``impl="generic"``, ``state_bits=8`` for block-wise 8-bit
        moment states (see :class:`~optim_core.Optimizer`)...). A checkpoint keeps
        quantized states' codes and scales exactly, so a resumed run is the same.

    Returns
    -------
    History
        Per-epoch losses, metrics, learning rate and time.

    Examples
    --------
    >>> from optim_core import fit, models, schedules
    >>> model = models.SoftmaxRegression(n_features=64, n_classes=10)
    >>> history = fit(model, X, y, optimizer="adam", lr=0.01, epochs=30, batch_size=64,
    ...               schedule=schedules.cosine(30 * 22), validation_data=(X_val, y_val),
    ...               seed=0, progress=False)  # doctest: +SKIP
    """
    run = _checked_run(model, X, y, optimizer=optimizer, lr=lr, epochs=epochs,
                       batch_size=batch_size, shuffle=shuffle, validation_data=validation_data,
                       schedule=schedule, weight_decay=weight_decay, l1=l1, l2=l2,
                       clip_norm=clip_norm, clip_value=clip_value, callbacks=callbacks,
                       seed=seed, progress=progress, nonfinite=nonfinite,
                       checkpoint=checkpoint, checkpoint_every=checkpoint_every,
                       resume=resume, blas_threads=blas_threads,
                       optimizer_kwargs=optimizer_kwargs)
    saved = _read_checkpoint(run, model)
    seed = _resolve_seed(run.seed if saved is None else saved["seed"])
    settings = _run_settings(model, run, seed)
    if saved is not None and saved["settings"] != settings:
        changed = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
        raise ValueError(f"cannot resume {run.checkpoint!r}: these settings differ from the "
                         f"saved run's: {', '.join(changed)}")
    params, data, validation = _set_up(run, model, seed, saved)
    auto = run.blas_threads == "auto"
    with limited_blas(1 if auto else run.blas_threads) as blas:
        choice = BlasThreadChoice(blas) if auto else None
        return _train(run, model, params, data, validation, seed, settings, saved, choice)


# ---------------------------------------------------------------------------- 1. arguments
def _checked_run(model: Any, X: Any, y: Any, *, optimizer: Any, lr: Any, epochs: Any,
                 batch_size: Any, shuffle: Any, validation_data: Any, schedule: Any,
                 weight_decay: Any, l1: Any, l2: Any, clip_norm: Any, clip_value: Any,
                 callbacks: Any, seed: Any, progress: Any, nonfinite: Any, checkpoint: Any,
                 checkpoint_every: Any, resume: Any, blas_threads: Any,
                 optimizer_kwargs: dict[str, Any]) -> _Run:
    """Every argument of :func:`fit` checked (TypeError/ValueError); nothing is changed."""
    if not isinstance(model, Model):
        raise TypeError(f"model must be an optim_core.models.Model, got {type(model).__name__}")
    data = data_adapters.adapter(X, y)
    model.check_inputs(data.X, data.y)
    if data.n_samples == 0:
        raise ValueError("X has no samples")
    epochs = checks.integer("epochs", epochs, minimum=0)
    batch_size = None if batch_size is None else \
        checks.integer("batch_size", batch_size, minimum=1)
    shuffle = checks.boolean("shuffle", shuffle)
    progress = checks.boolean("progress", progress)
    validation = None
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("validation_data must be a pair (X_val, y_val)")
        validation = data_adapters.adapter(*validation_data, what="_val")
        if validation.xp is not data.xp or validation.device != data.device:
            raise TypeError("validation_data must be in the training data's array library "
                            "and on its device")
        model.check_inputs(validation.X, validation.y, "_val")
        if validation.n_samples == 0:
            raise ValueError("X_val has no samples")
    if weight_decay is not None:
        weight_decay = _nonnegative("weight_decay", weight_decay)
    l1 = _nonnegative("l1", l1)
    l2 = _nonnegative("l2", l2)
    clip_norm = _positive_or_none("clip_norm", clip_norm)
    clip_value = _positive_or_none("clip_value", clip_value)
    if schedule is not None and not callable(schedule):
        raise TypeError(f"schedule must be callable (base_lr, step) -> lr, got {schedule!r}")
    if nonfinite is not None:
        checks.choice("nonfinite", nonfinite, _NONFINITE)
    if isinstance(callbacks, (str, bytes)) or not isinstance(callbacks, Iterable):
        raise TypeError("callbacks must be a sequence of callback objects")
    callbacks = list(callbacks)
    if any(isinstance(hook, ReduceOnPlateau) for hook in callbacks):
        raise ValueError("ReduceOnPlateau sets the learning rate: pass it as schedule=, "
                         "not in callbacks")
    hooks = callbacks + ([schedule] if hasattr(schedule, "on_epoch_end") else [])
    for hook in hooks:
        monitor = _monitored(hook)
        if monitor is None:
            continue
        if monitor not in _LOG_KEYS[1:5]:
            raise ValueError(f"{type(hook).__name__} monitors {monitor!r}; epoch logs have "
                             f"{', '.join(_LOG_KEYS[1:5])}")
        if monitor.startswith("val_") and validation_data is None:
            raise ValueError(f"{type(hook).__name__} monitors {monitor!r}, which needs "
                             "validation_data")
    if isinstance(optimizer, Optimizer):
        if optimizer_kwargs:
            raise TypeError(f"optimizer keyword arguments {sorted(optimizer_kwargs)} apply to "
                            "an optimizer given by name, not to an instance")
        if weight_decay:
            raise ValueError("with an optimizer instance, configure weight decay on it; "
                             "fit's weight_decay must be None or 0")
        if model.params is None:
            raise ValueError("an optimizer instance must be built on model.params: initialize "
                             "the model first (model.init_params(X, seed))")
        if not _built_on(optimizer, model.params):
            raise ValueError("the optimizer instance must be built on model.params "
                             "(the same dict of arrays, or copies of them with flat=True)")
        if lr is not None:
            lr = _nonnegative("lr", lr)
    elif isinstance(optimizer, str) or (isinstance(optimizer, type)
                                        and issubclass(optimizer, Optimizer)):
        _optimizer_class(optimizer)  # ValueError listing the known names
        if "weight_decay" in optimizer_kwargs:
            raise TypeError("give weight_decay as fit's weight_decay (decoupled decay); "
                            "use l2= for an L2 penalty")
    else:
        raise TypeError(f"optimizer must be a name, an Optimizer subclass or an Optimizer, "
                        f"got {type(optimizer).__name__}")
    checkpoint_every = checks.integer("checkpoint_every", checkpoint_every, minimum=1)
    resume = checks.boolean("resume", resume)
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        folder = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint folder {folder!r} does not exist")
    elif resume:
        raise ValueError("resume=True needs a checkpoint path")
    if seed is not None:
        seed = checks.integer("seed", seed, minimum=0)
    if model.params is not None:
        data.check_library(next(iter(model.params.values())))
    if blas_threads is not None:
        if not (isinstance(blas_threads, str) and blas_threads == "auto"):
            blas_threads = checks.integer("blas_threads", blas_threads, minimum=1)
        if not isinstance(data.param_like(), np.ndarray):
            blas_threads = None  # another library's products: its own threads
    return _Run(data=data, validation=validation, optimizer=optimizer,
                optimizer_kwargs=dict(optimizer_kwargs), lr=lr, epochs=epochs,
                batch_size=batch_size, shuffle=shuffle, schedule=schedule,
                weight_decay=weight_decay, l1=l1, l2=l2, clip_norm=clip_norm,
                clip_value=clip_value, callbacks=callbacks, hooks=hooks, seed=seed,
                progress=progress, nonfinite=nonfinite, checkpoint=checkpoint,
                checkpoint_every=checkpoint_every, resume=resume, blas_threads=blas_threads)


# ---------------------------------------------------------------------------- 2. checkpoint
_CHECKPOINT_FORMAT = "optim-core-fit"
_CHECKPOINT_VERSION = 1
_CHECKPOINT_KEYS = ("settings", "epoch", "step", "seed", "base_lrs", "stopped_early",
                    "skipped_steps", "params", "optimizer", "history", "hooks")


def _stateful(hooks: list[Any]) -> list[Any]:
    """The callbacks and schedule whose state a checkpoint keeps."""
    return [hook for hook in hooks
            if hasattr(hook, "state_dict") and hasattr(hook, "load_state_dict")]


def _run_settings(model: Model, run: _Run, seed: int) -> dict[str, Any]:
    """What must match between an interrupted run and its continuation."""
    optimizer = run.optimizer
    return {
        "model": type(model).__name__,
        "param_shapes": {name: list(shape) for name, shape in model.param_shapes().items()},
        "optimizer": (type(optimizer).__name__ if isinstance(optimizer, Optimizer)
                      else _optimizer_class(optimizer).__name__),
        "n_samples": run.data.n_samples, "batch_size": run.batch_size, "shuffle": run.shuffle,
        "lr": run.lr, "weight_decay": run.weight_decay, "l1": run.l1, "l2": run.l2,
        "clip_norm": run.clip_norm, "clip_value": run.clip_value, "seed": seed,
    }


def _run_state(settings: dict[str, Any], epoch: int, step: int, seed: int,
               base_lrs: list[float], params: TrainedParams, history: History,
               hooks: list[Any]) -> dict[str, Any]:
    optimizer = params.optimizer
    return {
        "format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "settings": settings,
        "epoch": epoch, "step": step, "seed": seed, "base_lrs": list(base_lrs),
        "stopped_early": history.stopped_early, "skipped_steps": optimizer.skipped_steps,
        "params": dict(params.arrays), "optimizer": optimizer.state_dict(),
        "history": history.to_dicts(), "hooks": [hook.state_dict() for hook in _stateful(hooks)],
    }


def _read_checkpoint(run: _Run, model: Model) -> dict[str, Any] | None:
    """With ``resume`` and an existing file, its run state, checked against this call.

    Everything that can be checked without the optimizer is checked here, before
    anything changes: the format, the seed, the number of stateful callbacks, the
    counters and history, and every saved parameter's name, shape and dtype against the
    model's (a parameter of another shape is an error, never broadcast).
    """
    if not run.resume or not os.path.exists(run.checkpoint):
        return None
    path = run.checkpoint
    saved = load_checkpoint(path)
    if not isinstance(saved, dict) or saved.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError(f"the checkpoint {path!r} was not written by optim_core.fit")
    if saved.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"unsupported fit checkpoint version {saved.get('version')!r}")
    missing = [key for key in _CHECKPOINT_KEYS if key not in saved]
    if missing:
        raise ValueError(f"cannot resume {path!r}: the checkpoint lacks {missing}")

    def bad(what: str) -> ValueError:
        return ValueError(f"cannot resume {path!r}: {what}")

    try:
        seed = checks.integer("the saved seed", saved["seed"], minimum=0)
        for key in ("epoch", "step", "skipped_steps"):
            checks.integer(f"the saved {key}", saved[key], minimum=0)
        checks.boolean("the saved stopped_early", saved["stopped_early"])
        if not isinstance(saved["base_lrs"], list):
            raise bad("base_lrs is not a list")
        for i, value in enumerate(saved["base_lrs"]):
            checks.number(f"the saved base_lrs[{i}]", value, low=0.0)
    except ValueError as exc:
        raise bad(str(exc)) from None
    if run.seed is not None and run.seed != seed:
        raise ValueError(f"cannot resume: seed={run.seed} but the saved run used {seed}")
    stateful = _stateful(run.hooks)
    if not isinstance(saved["hooks"], list) or len(saved["hooks"]) != len(stateful):
        count = len(saved["hooks"]) if isinstance(saved["hooks"], list) else "?"
        raise ValueError(f"cannot resume: the saved run had {count} stateful "
                         f"callbacks/schedules, this call has {len(stateful)}")
    if not isinstance(saved["settings"], dict):
        raise bad("its settings are not a dict")
    history = saved["history"]
    if not isinstance(history, list) or not all(
            isinstance(entry, dict) and set(entry) == set(_LOG_KEYS) for entry in history):
        raise bad(f"its history must be a list of epoch logs with the keys {list(_LOG_KEYS)}")
    if not isinstance(saved["optimizer"], dict):
        raise bad("its optimizer state is not a dict")
    shapes = model.param_shapes()
    params = saved["params"]
    if not isinstance(params, dict) or list(params) != list(shapes):
        names = list(params) if isinstance(params, dict) else type(params).__name__
        raise bad(f"it holds the parameters {names}, the model {list(shapes)}")
    for name, shape in shapes.items():
        value = params[name]
        if not isinstance(value, np.ndarray):
            raise bad(f"parameter {name!r} is a {type(value).__name__}, not an array")
        if tuple(value.shape) != shape:
            raise bad(f"parameter {name!r} has shape {tuple(value.shape)}, the model's "
                      f"{shape}")
        if value.dtype.kind != "f" and not (value.dtype.kind == "V"
                                            and "float" in value.dtype.name):
            raise bad(f"parameter {name!r} has dtype {value.dtype}, not a floating dtype")
    return saved


# ---------------------------------------------------------------------------- 3. set up
def _set_up(run: _Run, model: Model, seed: int,
            saved: dict[str, Any] | None) -> tuple[TrainedParams, Any, Any]:
    """Parameters, optimizer, restored state and the data in the parameters' dtype.

    A failure leaves the model (its parameters, None or the arrays it had), an
    optimizer instance (its state and settings) and the callbacks as they were.
    """
    previous = model.params
    instance = run.optimizer if run.instance else None
    before = None if instance is None else (instance.state_dict(), instance.nonfinite)
    try:
        if previous is None:
            model.init_params(run.data.param_like(), seed=seed)
        if instance is None:
            optimizer = make_optimizer(run.optimizer, model.params, lr=run.lr,
                                       weight_decay=run.weight_decay,
                                       nonfinite=run.nonfinite or "raise",
                                       **run.optimizer_kwargs)
        else:
            optimizer = instance
            if run.lr is not None:
                for group in optimizer.param_groups:
                    group["lr"] = run.lr
            if run.nonfinite is not None:
                optimizer.nonfinite = run.nonfinite
        params = TrainedParams(model, optimizer)
        if saved is not None:
            _restore(saved, params, run.hooks, run.checkpoint)
        dtype = next(iter(params.arrays.values())).dtype
        data = run.data.in_dtype(model, dtype)
        validation = None if run.validation is None else run.validation.in_dtype(model, dtype)
    except BaseException:
        model.params = previous
        if before is not None:
            instance.load_state_dict(before[0])
            instance.nonfinite = before[1]
        raise
    return params, data, validation


def _restore(saved: dict[str, Any], params: TrainedParams, hooks: list[Any],
             path: str) -> None:
    """Put a checked checkpoint (:func:`_read_checkpoint`) into the run.

    Each stateful callback's saved state is tried on it and its own put back (they are
    loaded by :func:`_train`, after ``on_train_begin``); then the optimizer's state is
    loaded (its ``load_state_dict`` checks everything before writing), and last the
    parameters, whose names, shapes and dtypes were checked already.
    """
    optimizer = params.optimizer
    if len(saved["base_lrs"]) != len(optimizer.param_groups):
        raise ValueError(f"cannot resume {path!r}: it has {len(saved['base_lrs'])} base "
                         f"learning rates, the optimizer {len(optimizer.param_groups)} groups")
    for hook, state in zip(_stateful(hooks), saved["hooks"], strict=True):
        # Checked now, loaded by _train after on_train_begin (which may reset the hook).
        before = hook.state_dict()
        try:
            hook.load_state_dict(state)
        finally:
            hook.load_state_dict(before)
    optimizer.load_state_dict(saved["optimizer"])
    arrays = params.arrays
    for group, names in enumerate(params.group_names):
        # Written into the arrays in place (an optimizer instance built on them stays attached).
        params.write(group, names, [ns.from_numpy(params.xp, saved["params"][name],
                                                  like=arrays[name]) for name in names])
    optimizer.skipped_steps = saved["skipped_steps"]


# ---------------------------------------------------------------------------- 4. train
def _train(run: _Run, model: Model, params: TrainedParams, data: Any, validation: Any,
           seed: int, settings: dict[str, Any], saved: dict[str, Any] | None,
           blas_choice: BlasThreadChoice | None) -> History:
    """The epochs: batches, the step chain, the epoch's logs, callbacks, checkpoints."""
    optimizer = params.optimizer
    arrays = params.arrays
    classifier = model.task == "classification"
    step_chain = training_step(params, model.regularized, l2=run.l2, clip_value=run.clip_value,
                               clip_norm=run.clip_norm, weight_decay=run.weight_decay,
                               l1=run.l1, masks=[hook for hook in run.callbacks
                                                 if hasattr(hook, "step_masks")])
    schedule, hooks, epochs = run.schedule, run.hooks, run.epochs
    base_lrs = [float(group["lr"]) for group in optimizer.param_groups] if saved is None \
        else [float(lr) for lr in saved["base_lrs"]]
    history = History(model.metric_name, seed)
    history.optimizer = optimizer
    for hook in run.callbacks:
        if hasattr(hook, "on_train_begin"):
            hook.on_train_begin(model, history)
    first_epoch, step = 1, 0
    if saved is not None:
        history.epochs = [dict(entry) for entry in saved["history"]]
        history.stopped_early = saved["stopped_early"]
        history.steps = step = saved["step"]
        first_epoch = saved["epoch"] + 1
        for hook, state in zip(_stateful(hooks), saved["hooks"], strict=True):
            hook.load_state_dict(state)
    if history.stopped_early:
        first_epoch = epochs + 1
    bar = progress_bar(epochs, "fit", "epoch", run.progress)
    if bar is not None and first_epoch > 1:
        bar.update(min(first_epoch - 1, epochs))
    # A schedule-free optimizer trains at y and is evaluated at the average x: each epoch
    # starts with train() and ends with eval(), so validation, callbacks (early
    # stopping's best weights), checkpoints and the returned model all see x.
    averaged = isinstance(optimizer, ScheduleFreeOptimizer)
    try:
        for epoch in range(first_epoch, epochs + 1):
            started = time.perf_counter()
            loss_sum = correct_sum = None
            if averaged:
                optimizer.train()
                params.pull()
            first_step = step
            for X_batch, y_batch in data.batches(run.batch_size, run.shuffle,
                                                 _epoch_rng(seed, epoch)):
                if blas_choice is not None:
                    blas_choice.start()
                if schedule is not None:
                    count = optimizer.group_state[0]["step"]
                    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                        group["lr"] = float(schedule(base, count))
                loss, grads, correct = data.loss_and_grad(
                    model, arrays, X_batch, y_batch,
                    key=dropout_key(seed, _STREAM_DROPOUT, step), count_correct=classifier)
                try:
                    step_chain(grads)
                except ValueError as exc:
                    if "non-finite" in str(exc):
                        raise ValueError(f"epoch {epoch}, step {step + 1}: {exc}") from exc
                    raise
                step += 1
                if blas_choice is not None:
                    blas_choice.stop(X_batch.shape[0])
                weighted = loss * X_batch.shape[0]
                loss_sum = weighted if loss_sum is None else loss_sum + weighted
                if classifier:
                    correct_sum = correct if correct_sum is None else correct_sum + correct
            history.blas_threads.append(blas_choice.take_steps() if blas_choice is not None
                                        else {run.blas_threads: step - first_step})
            if averaged:
                optimizer.eval()
                params.pull()  # new arrays on immutable libraries
            logs = _epoch_logs(model, epoch, loss_sum, correct_sum, data, validation, params,
                               started)
            history.epochs.append(logs)
            history.steps = step
            if bar is not None:
                bar.update(1)
                bar.set_postfix({k: f"{logs[k]:.4g}" for k in _LOG_KEYS[1:5]
                                 if logs[k] is not None}, refresh=False)
            stop = False
            for hook in hooks:
                if hasattr(hook, "on_epoch_end"):
                    stop = bool(hook.on_epoch_end(epoch, dict(logs), model)) or stop
            if stop:
                history.stopped_early = epoch < epochs
            if run.checkpoint is not None and (stop or epoch == epochs
                                               or epoch % run.checkpoint_every == 0):
                save_checkpoint(run.checkpoint, _run_state(
                    settings, epoch, step, seed, base_lrs, params, history, hooks))
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    history.best_epoch = history._lowest_loss_epoch()
    for hook in run.callbacks:
        if hasattr(hook, "on_train_end"):
            hook.on_train_end(model, history)
    if model.params is not None:
        # A callback may have put other arrays into the model: the optimizer follows them.
        params.reattach(model.params)
    return history


def _epoch_logs(model: Model, epoch: int, loss_sum: Any, correct_sum: Any, data: Any,
                validation: Any, params: TrainedParams, started: float) -> dict[str, Any]:
    n_samples = data.n_samples
    train_loss = float(loss_sum / n_samples)
    if model.task == "classification":
        train_metric = float(correct_sum) / n_samples
    else:  # the loss is a mean squared error: its running sum is the residual sum of squares
        train_metric = r2(train_loss * n_samples * outputs_per_sample(data.y), data.spread())
    logs: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss,
                            "train_metric": train_metric, "val_loss": None,
                            "val_metric": None,
                            "lr": float(params.optimizer.param_groups[0]["lr"])}
    if validation is not None:
        logs["val_loss"], logs["val_metric"] = validation.evaluate(model, params.arrays)
    logs["time"] = time.perf_counter() - started
    return logs
