r"""Training: :func:`fit` runs an optimizer over mini-batches and records a :class:`History`.

Everything stays on the data's array library and device: parameters are created
there, batches are gathered there (``xp.take`` with an index array moved to the
device once per epoch), and the only host transfers per epoch are a few scalars
(the losses and metrics of the epoch). Runs are deterministic for a given seed:
the initial parameters, each epoch's order and each step's dropout masks are pure
functions of ``(seed, epoch)`` and ``(seed, step)``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from .. import _namespace as ns
from ..optim import registry as _registry
from ..optim.base import Optimizer
from . import dask_data
from .checkpoint import load_checkpoint, save_checkpoint
from .models import Model, _r2
from .regularization import (
    _store,
    add_l2_gradient,
    apply_soft_threshold,
    clip_by_global_norm,
    clip_by_value,
    decay_weights,
    dropout_key,
)
from .schedules import ReduceOnPlateau

__all__ = ["fit", "History", "OPTIMIZERS", "make_optimizer", "epoch_order"]

#: Optimizer classes by the (lower-case) names :func:`fit` accepts (the optimizers' registry).
OPTIMIZERS = _registry.OPTIMIZERS

# Stream identifiers mixed into the seed, so no two uses share random numbers.
_STREAM_ORDER = 1
_STREAM_DROPOUT = 2

_LOG_KEYS = ("epoch", "train_loss", "train_metric", "val_loss", "val_metric", "lr", "time")


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
    """

    def __init__(self, metric_name: str = "metric", seed: int | None = None) -> None:
        self.epochs: list[dict[str, Any]] = []
        self.metric_name = metric_name
        self.stopped_early = False
        self.best_epoch: int | None = None
        self.seed = seed
        self.optimizer: Optimizer | None = None
        self.steps = 0

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


def make_optimizer(name: str, params: Mapping[str, Any], *, lr: float | None = None,
                   weight_decay: float | None = None, nonfinite: str = "raise",
                   **kwargs: Any) -> Optimizer:
    """Build the optimizer called ``name`` (case-insensitive; see :data:`OPTIMIZERS`).

    ``lr=None`` keeps the optimizer's default. ``weight_decay`` is decoupled decay,
    passed to optimizers that implement it (AdamW and Lion always, Adam, NAdam and
    RAdam with ``decoupled_weight_decay=True``); for the others it is applied by
    :func:`fit`, so it is not passed here. None keeps the optimizer's default
    (AdamW's 0.01).
    """
    cls = _registry.optimizer_class(name)
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


def _fit_applies_decay(optimizer: Optimizer) -> bool:
    """Whether fit must apply decoupled weight decay itself for this optimizer."""
    return optimizer.weight_decay_kind not in ("decoupled", "switchable")


def _check_nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _check_positive_or_none(name: str, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 or None, got {value!r}")
    return float(value)


def _check_count(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}"
                         f"{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def _resolve_seed(seed: Any) -> int:
    if seed is None:
        return int(np.random.SeedSequence().entropy % (1 << 63))
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0 or None, got {seed!r}")
    return int(seed)


def _check_data(X: Any, y: Any, what: str) -> Any:
    arrays = [X, y]
    if ns.is_dask_array(X) or ns.is_dask_array(y):
        dask_data.check_data(X, y, what)
    xp = ns.common_namespace(arrays, [f"X{what}", f"y{what}"], what="array")
    if X.ndim != 2:
        raise ValueError(f"X{what} must have shape (n_samples, n_features), got {tuple(X.shape)}")
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"X{what} has {X.shape[0]} samples but y{what} has {y.shape[0]}")
    if X.shape[0] == 0:
        raise ValueError(f"X{what} has no samples")
    return xp


def _monitored(obj: Any) -> str | None:
    monitor = getattr(obj, "monitor", None)
    return monitor if isinstance(monitor, str) else None


def fit(model: Model, X: Any, y: Any, *, optimizer: str | Optimizer = "adam",
        lr: float | None = None, epochs: int = 10, batch_size: int | None = None,
        shuffle: bool = True, validation_data: tuple[Any, Any] | None = None,
        schedule: Callable[[float, int], float] | None = None,
        weight_decay: float | None = None, l1: float = 0.0, l2: float = 0.0,
        clip_norm: float | None = None, clip_value: float | None = None,
        callbacks: Iterable[Any] = (), seed: int | None = None, progress: bool = True,
        nonfinite: str | None = None, checkpoint: str | os.PathLike[str] | None = None,
        checkpoint_every: int = 1, resume: bool = False,
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
        are then shuffled chunk by chunk (see :mod:`optim_core.dask_support`).
    optimizer : str or Optimizer
        A name from :data:`OPTIMIZERS` (case-insensitive), or an optimizer already
        built on ``model.params`` (a dict, so gradients can be matched by name).
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
    seed : int, optional
        Seeds the initial parameters, the order of the samples and dropout; None
        draws one from the operating system (recorded in :attr:`History.seed`).
    progress : bool
        Show a tqdm progress bar over the epochs.
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
        interrupted (timings aside). The call must repeat the interrupted one:
        settings that change the trajectory (optimizer, batch size, penalties,
        clipping, seed, data size, model) are compared and a difference raises
        ValueError before anything changes; ``epochs`` may be raised to train on.
        A run that had stopped early is not continued.
    **optimizer_kwargs
        Further hyperparameters for an optimizer given by name (``momentum=0.9``,
        ``betas=(0.9, 0.99)``, ``impl="generic"``...).

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
    # ---------------------------------------------------------------- validate everything
    if not isinstance(model, Model):
        raise TypeError(f"model must be an optim_core.models.Model, got {type(model).__name__}")
    xp = _check_data(X, y, "")
    epochs = _check_count("epochs", epochs, minimum=0)
    batch_size = _check_count("batch_size", batch_size, minimum=1, allow_none=True)
    if not isinstance(shuffle, bool):
        raise TypeError(f"shuffle must be a bool, got {shuffle!r}")
    if not isinstance(progress, bool):
        raise TypeError(f"progress must be a bool, got {progress!r}")
    if X.shape[1] != model.n_features:
        raise ValueError(f"X has {X.shape[1]} features, the model expects {model.n_features}")
    if validation_data is not None:
        if not isinstance(validation_data, (tuple, list)) or len(validation_data) != 2:
            raise ValueError("validation_data must be a pair (X_val, y_val)")
        X_val, y_val = validation_data
        if _check_data(X_val, y_val, "_val") is not xp or \
                ns.device_of(X_val) != ns.device_of(X):
            raise TypeError("validation_data must be in the training data's array library "
                            "and on its device")
        if X_val.shape[1] != model.n_features:
            raise ValueError(f"X_val has {X_val.shape[1]} features, the model expects "
                             f"{model.n_features}")
    if weight_decay is not None:
        weight_decay = _check_nonnegative("weight_decay", weight_decay)
    l1 = _check_nonnegative("l1", l1)
    l2 = _check_nonnegative("l2", l2)
    clip_norm = _check_positive_or_none("clip_norm", clip_norm)
    clip_value = _check_positive_or_none("clip_value", clip_value)
    if schedule is not None and not callable(schedule):
        raise TypeError(f"schedule must be callable (base_lr, step) -> lr, got {schedule!r}")
    if nonfinite is not None and nonfinite not in ("raise", "skip", "propagate"):
        raise ValueError(f"nonfinite must be 'raise', 'skip' or 'propagate', got {nonfinite!r}")
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
    instance = isinstance(optimizer, Optimizer)
    if instance:
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
            _check_nonnegative("lr", lr)
    elif isinstance(optimizer, str):
        if optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; known: {', '.join(OPTIMIZERS)}")
        if "weight_decay" in optimizer_kwargs:
            raise TypeError("give weight_decay as fit's weight_decay (decoupled decay); "
                            "use l2= for an L2 penalty")
    else:
        raise TypeError(f"optimizer must be a name or an Optimizer, got {type(optimizer).__name__}")
    checkpoint_every = _check_count("checkpoint_every", checkpoint_every, minimum=1)
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {resume!r}")
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        folder = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(folder):
            raise ValueError(f"checkpoint folder {folder!r} does not exist")
    elif resume:
        raise ValueError("resume=True needs a checkpoint path")
    saved = load_checkpoint(checkpoint) if resume and os.path.exists(checkpoint) else None
    if saved is not None:
        _check_saved_run(saved, seed, hooks)
        seed = saved["seed"]
    seed = _resolve_seed(seed)
    settings = _run_settings(model, optimizer, X.shape[0], batch_size, shuffle, lr,
                             weight_decay, l1, l2, clip_norm, clip_value, seed)
    if saved is not None and saved["settings"] != settings:
        changed = sorted(k for k in settings if saved["settings"].get(k) != settings[k])
        raise ValueError(f"cannot resume {checkpoint!r}: these settings differ from the "
                         f"saved run's: {', '.join(changed)}")
    if model.params is not None:
        first = next(iter(model.params.values()))
        like = ns.chunk_like(X)  # for Dask data, its chunks: parameters live there
        if ns.namespace_of(first) is not ns.namespace_of(like) or \
                ns.device_of(first) != ns.device_of(like):
            raise TypeError("the model's parameters and the data must share one array library "
                            "and device")

    # ---------------------------------------------------------------- set up
    created = model.params is None
    if created:
        model.init_params(X, seed=seed)
    if saved is not None:
        # Written into the existing arrays, so an optimizer instance built on them stays attached.
        model.params = {name: _store(param, ns.from_numpy(ns.namespace_of(param),
                                                          saved["params"][name], like=param))
                        for name, param in model.params.items()}
    if not instance:
        try:
            optimizer = make_optimizer(optimizer, model.params, lr=lr, weight_decay=weight_decay,
                                       nonfinite=nonfinite or "raise", **optimizer_kwargs)
        except (TypeError, ValueError):
            if created:  # a bad hyperparameter leaves the model as it was given
                model.params = None
            raise
    else:
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = float(lr)
        if nonfinite is not None:
            optimizer.nonfinite = nonfinite
    # The optimizer's arrays are the model's from now on (with flat=True, views of its buffer).
    model._params = dict(optimizer.params)
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        optimizer.skipped_steps = saved["skipped_steps"]
    decay_by_fit = bool(weight_decay) and _fit_applies_decay(optimizer)
    dtype = next(iter(model.params.values())).dtype
    X = X if X.dtype == dtype else xp.astype(X, dtype)
    if validation_data is not None:
        X_val = X_val if X_val.dtype == dtype else xp.astype(X_val, dtype)
    y = model._prepare_targets(xp, y, dtype)
    validation = None
    if validation_data is not None:
        validation = (X_val, model._prepare_targets(xp, y_val, dtype))
    regularized = set(model.regularized)
    lazy_data = ns.is_dask_array(X)
    classifier = model.task == "classification"
    # Regression metrics need the targets' spread, once per fit (a metric from running sums).
    train_spread = None if classifier else _spread(xp, y)
    if validation is not None and not classifier and not ns.is_dask_array(validation[0]):
        validation = (*validation, _spread(xp, validation[1]))
    base_lrs = [float(group["lr"]) for group in optimizer.param_groups]
    if saved is not None:
        base_lrs = list(saved["base_lrs"])

    history = History(model.metric_name, seed)
    history.optimizer = optimizer
    n_samples = X.shape[0]
    full_batch = batch_size is None or batch_size >= n_samples
    device = ns.device_of(X)
    for hook in callbacks:
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
    bar = _progress_bar(epochs, progress)
    if bar is not None and first_epoch > 1:
        bar.update(min(first_epoch - 1, epochs))

    # ---------------------------------------------------------------- train
    try:
        for epoch in range(first_epoch, epochs + 1):
            started = time.perf_counter()
            if full_batch:
                batches: Iterable[tuple[Any, Any]] = ((X, y),)
            else:
                batches = _batches(xp, X, y, batch_size, shuffle, seed, epoch, device)
            loss_sum = correct_sum = None
            for X_batch, y_batch in batches:
                if schedule is not None:
                    count = optimizer.group_state[0]["step"]
                    for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
                        group["lr"] = float(schedule(base, count))
                key = dropout_key(seed, _STREAM_DROPOUT, step)
                if lazy_data:
                    # Dask: loss, gradients and correct labels from one task per chunk.
                    _, X_batch, y_batch = model._prepare(X_batch, y_batch)
                    loss, grads, correct = dask_data.loss_and_grad(
                        model, X_batch, y_batch, training=True, key=key,
                        count_correct=classifier)
                    if classifier:
                        correct_sum = correct if correct_sum is None else correct_sum + correct
                else:
                    # One forward pass gives the loss, the gradients and the batch's outputs.
                    _, X_batch, y_batch = model._prepare(X_batch, y_batch)
                    loss, grads, outputs = model._loss_grad(
                        xp, model.params, X_batch, y_batch, training=True, key=key,
                        need_grad=True, return_outputs=True)
                    if classifier:
                        correct = model._metric_terms(xp, outputs, y_batch)
                        correct_sum = correct if correct_sum is None else correct_sum + correct
                grads = add_l2_gradient(grads, model.params, l2, regularized)
                if clip_value is not None:
                    grads = clip_by_value(grads, clip_value)
                if clip_norm is not None:
                    grads, _ = clip_by_global_norm(grads, clip_norm)
                skipped = optimizer.skipped_steps
                if decay_by_fit:
                    _for_each_group(optimizer, regularized, lambda params, names, lr:
                                    decay_weights(params, names, 1.0 - lr * weight_decay))
                try:
                    optimizer.step(grads)
                except ValueError as exc:
                    if "non-finite" in str(exc):
                        raise ValueError(f"epoch {epoch}, step {step + 1}: {exc}") from exc
                    raise
                if l1 and optimizer.skipped_steps == skipped:
                    _for_each_group(optimizer, regularized, lambda params, names, lr:
                                    apply_soft_threshold(params, names, lr * l1))
                model._params = dict(optimizer.params)
                step += 1
                weighted = loss * X_batch.shape[0]
                loss_sum = weighted if loss_sum is None else loss_sum + weighted
            logs = _epoch_logs(model, epoch, loss_sum, correct_sum, n_samples, X, y,
                               train_spread, validation, optimizer, started)
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
            if checkpoint is not None and (stop or epoch == epochs
                                           or epoch % checkpoint_every == 0):
                save_checkpoint(checkpoint, _run_state(
                    settings, epoch, step, seed, base_lrs, model, optimizer, history, hooks))
            if stop:
                break
    finally:
        if bar is not None:
            bar.close()
    history.best_epoch = history._lowest_loss_epoch()
    for hook in callbacks:
        if hasattr(hook, "on_train_end"):
            hook.on_train_end(model, history)
    if model.params is not None:
        # A callback may have restored other values into the arrays: keep the optimizer's view.
        for group in optimizer.param_groups:
            group["params"] = [model.params[name] for name in group["names"]]
    return history


_CHECKPOINT_FORMAT = "optim-core-fit"
_CHECKPOINT_VERSION = 1


def _stateful(hooks: list[Any]) -> list[Any]:
    """The callbacks and schedule whose state a checkpoint keeps."""
    return [hook for hook in hooks
            if hasattr(hook, "state_dict") and hasattr(hook, "load_state_dict")]


def _run_settings(model: Model, optimizer: Any, n_samples: int, batch_size: int | None,
                  shuffle: bool, lr: float | None, weight_decay: float | None, l1: float,
                  l2: float, clip_norm: float | None, clip_value: float | None,
                  seed: int) -> dict[str, Any]:
    """What must match between an interrupted run and its continuation."""
    return {
        "model": type(model).__name__,
        "param_shapes": {name: list(shape) for name, shape in model.param_shapes().items()},
        "optimizer": (type(optimizer).__name__ if isinstance(optimizer, Optimizer)
                      else OPTIMIZERS[optimizer.lower()].__name__),
        "n_samples": int(n_samples), "batch_size": batch_size, "shuffle": shuffle, "lr": lr,
        "weight_decay": weight_decay, "l1": l1, "l2": l2, "clip_norm": clip_norm,
        "clip_value": clip_value, "seed": seed,
    }


def _run_state(settings: dict[str, Any], epoch: int, step: int, seed: int,
               base_lrs: list[float], model: Model, optimizer: Optimizer, history: History,
               hooks: list[Any]) -> dict[str, Any]:
    return {
        "format": _CHECKPOINT_FORMAT, "version": _CHECKPOINT_VERSION, "settings": settings,
        "epoch": epoch, "step": step, "seed": seed, "base_lrs": list(base_lrs),
        "stopped_early": history.stopped_early, "skipped_steps": optimizer.skipped_steps,
        "params": dict(model.params), "optimizer": optimizer.state_dict(),
        "history": history.to_dicts(), "hooks": [hook.state_dict() for hook in _stateful(hooks)],
    }


def _check_saved_run(saved: Any, seed: int | None, hooks: list[Any]) -> None:
    """ValueError unless ``saved`` is a fit checkpoint this call can continue."""
    if not isinstance(saved, dict) or saved.get("format") != _CHECKPOINT_FORMAT:
        raise ValueError("the checkpoint was not written by optim_core.fit")
    if saved.get("version") != _CHECKPOINT_VERSION:
        raise ValueError(f"unsupported fit checkpoint version {saved.get('version')!r}")
    if seed is not None and seed != saved["seed"]:
        raise ValueError(f"cannot resume: seed={seed} but the saved run used {saved['seed']}")
    stateful = _stateful(hooks)
    if len(saved["hooks"]) != len(stateful):
        raise ValueError(f"cannot resume: the saved run had {len(saved['hooks'])} stateful "
                         f"callbacks/schedules, this call has {len(stateful)}")


def _progress_bar(epochs: int, progress: bool) -> Any:
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=epochs, desc="fit", unit="epoch")


def _for_each_group(optimizer: Optimizer, names: set[str],
                    action: Callable[[dict[str, Any], list[str], float], None]) -> None:
    """Run ``action(params, names, lr)`` on each group's regularized parameters, in place."""
    for group in optimizer.param_groups:
        params = dict(zip(group["names"], group["params"], strict=True))
        chosen = [name for name in group["names"] if name in names]
        if not chosen:
            continue
        action(params, chosen, float(group["lr"]))
        group["params"] = [params[name] for name in group["names"]]


def epoch_order(seed: int, epoch: int, n_samples: int) -> np.ndarray:
    """The order :func:`fit` visits the samples in, in ``epoch`` (from 1), under ``seed``."""
    return np.random.default_rng([seed, _STREAM_ORDER, epoch]).permutation(n_samples)


def _batches(xp: Any, X: Any, y: Any, batch_size: int, shuffle: bool, seed: int, epoch: int,
             device: Any) -> Iterable[tuple[Any, Any]]:
    if ns.is_dask_array(X):
        # Batches from one or two chunks each, never a gather from every chunk.
        rng = np.random.default_rng([seed, _STREAM_ORDER, epoch])
        yield from dask_data.batches(X, y, batch_size, shuffle, rng)
        return
    n_samples = X.shape[0]
    if shuffle:
        # One host-to-device transfer per epoch; each batch is gathered on the device.
        order = xp.asarray(epoch_order(seed, epoch, n_samples), dtype=xp.int64, device=device)
        for start in range(0, n_samples, batch_size):
            index = order[start:min(start + batch_size, n_samples)]
            yield xp.take(X, index, axis=0), xp.take(y, index, axis=0)
    else:
        for start in range(0, n_samples, batch_size):
            stop = min(start + batch_size, n_samples)
            yield X[start:stop, ...], y[start:stop, ...]


def _spread(xp: Any, y: Any) -> float:
    """Sum of squared deviations of regression targets from their (per-output) mean."""
    return float(xp.sum((y - xp.mean(y, axis=0)) ** 2))


def _outputs_per_sample(y: Any) -> int:
    return 1 if y.ndim == 1 else int(y.shape[1])


def _evaluate(model: Model, X: Any, y: Any, spread: float | None) -> tuple[float, float]:
    """Loss and metric of ``(X, y)`` from one forward pass (no dropout)."""
    if ns.is_dask_array(X):
        return model.loss(X, y), model.score(X, y)
    xp, X, y = model._prepare(X, y)
    loss, _, outputs = model._loss_grad(xp, model.params, X, y, training=False, key=None,
                                        need_grad=False, return_outputs=True)
    if model.task == "classification":
        return float(loss), float(model._metric_terms(xp, outputs, y)) / X.shape[0]
    loss = float(loss)
    return loss, _r2(loss * X.shape[0] * _outputs_per_sample(y), spread)


def _epoch_logs(model: Model, epoch: int, loss_sum: Any, correct_sum: Any, n_samples: int,
                X: Any, y: Any, train_spread: float | None, validation: Sequence[Any] | None,
                optimizer: Optimizer, started: float) -> dict[str, Any]:
    train_loss = float(loss_sum / n_samples)
    if model.task == "classification":
        train_metric = float(correct_sum) / n_samples
    else:  # the loss is a mean squared error: its running sum is the residual sum of squares
        train_metric = _r2(train_loss * n_samples * _outputs_per_sample(y), train_spread)
    logs: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss,
                            "train_metric": train_metric, "val_loss": None,
                            "val_metric": None, "lr": float(optimizer.param_groups[0]["lr"])}
    if validation:
        logs["val_loss"], logs["val_metric"] = _evaluate(model, *validation[:2],
                                                         *validation[2:] or (None,))
    logs["time"] = time.perf_counter() - started
    return logs
