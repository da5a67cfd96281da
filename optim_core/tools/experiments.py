"""The founding article's FAQ, as tools.

The article's closing questions, "which learning rate?", "which optimizer and
batch size?" and "how do the optimizers compare?", each get a function that
answers it by experiment on the caller's model and data:

* :func:`lr_find`: the learning rate range test (Smith, "Cyclical Learning
  Rates for Training Neural Networks", WACV 2017): train with a learning rate
  growing exponentially every step, record the loss, suggest a rate.
* :func:`tune`: grid search over optimizer x learning rate x batch size, each
  configuration scored by k-fold cross-validation.
* :func:`compare`: several optimizers trained on one task from the same
  initial parameters: loss curves, time, final metric.

Each returns a small result object with a ``table`` (a list of flat dicts, one
per row) and writers for CSV and JSON. A model argument is either a model
(copied, so every run starts from the same parameters) or a callable returning
a fresh one.
"""

from __future__ import annotations

import copy
import csv
import inspect
import itertools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .. import _checks as checks
from .. import _namespace as ns
from ..train.extras import progress_bar, require

__all__ = ["lr_find", "tune", "compare", "LRFinderResult", "TuneResult", "CompareResult",
           "write_csv", "write_json", "format_table"]


# ----------------------------------------------------------------------------- results

def _plain(value: Any) -> Any:
    """A JSON-safe copy: NumPy scalars to Python, non-finite floats to None."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` (flat dicts) as CSV; columns in first-seen order."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(_plain(dict(row)) for row in rows)
    return path


def write_json(data: Any, path: str | Path) -> Path:
    """Write ``data`` as indented JSON (NaN and infinities become null)."""
    path = Path(path)
    path.write_text(json.dumps(_plain(data), indent=2) + "\n")
    return path


def _format_cell(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if value is None:
        return "-"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
            return f"{value:.3e}"
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """Render ``rows`` as an aligned plain-text table."""
    if not rows:
        return "(no rows)"
    columns = list(columns) if columns is not None else list(rows[0])
    cells = [[_format_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                       enumerate(zip(columns, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))))
    return "\n".join(lines)


class _Result:
    table: list[dict[str, Any]]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_csv(self, path: str | Path) -> Path:
        """Write :attr:`table` as CSV."""
        return write_csv(self.table, path)

    def to_json(self, path: str | Path) -> Path:
        """Write :meth:`to_dict` as JSON."""
        return write_json(self.to_dict(), path)

    def format(self) -> str:
        """:attr:`table` as aligned text."""
        return format_table(self.table)


def _higher_first(value: Any) -> float:
    """Sort key putting the largest finite value first and NaN/None last."""
    if value is None or not math.isfinite(value):
        return math.inf
    return -value


def _lower_first(value: Any) -> float:
    """Sort key putting the smallest finite value first and NaN/None last."""
    if value is None or not math.isfinite(value):
        return math.inf
    return value


@dataclass
class LRFinderResult(_Result):
    """Outcome of :func:`lr_find`.

    Attributes
    ----------
    lrs, losses, smoothed_losses : list of float
        Learning rate of each step, the batch loss it was applied to, and the
        bias-corrected exponential moving average of those losses.
    suggested_lr : float
        The learning rate at the minimum of the smoothed loss, divided by 10: the
        largest rate that is still clearly on the descending part of the curve.
    steepest_lr : float or None
        Where the smoothed loss falls fastest per decade of learning rate, before
        its minimum (the first tenth of the steps, at most 10, skipped); None when
        the minimum comes too early to tell.
    diverged : bool
        Whether the test stopped early because the loss blew up.
    optimizer : str
    """

    lrs: list[float]
    losses: list[float]
    smoothed_losses: list[float]
    suggested_lr: float
    steepest_lr: float | None
    diverged: bool
    optimizer: str

    @property
    def table(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [dict(step=i + 1, lr=lr, loss=loss, smoothed_loss=smooth)
                for i, (lr, loss, smooth) in
                enumerate(zip(self.lrs, self.losses, self.smoothed_losses, strict=True))]

    @property
    def best(self) -> dict[str, Any]:
        """The suggestion as a row: optimizer and lr."""
        return dict(optimizer=self.optimizer, lr=self.suggested_lr)

    def to_dict(self) -> dict[str, Any]:
        return dict(kind="lr_find", optimizer=self.optimizer, suggested_lr=self.suggested_lr,
                    steepest_lr=self.steepest_lr, diverged=self.diverged, table=self.table)

    def format(self) -> str:
        stopped = ", stopped at divergence" if self.diverged else ""
        steepest = "" if self.steepest_lr is None else \
            f"   (steepest descent at {self.steepest_lr:.3e})"
        return (f"lr range test ({self.optimizer}, {len(self.lrs)} steps, "
                f"{self.lrs[0]:.1e} .. {self.lrs[-1]:.1e}{stopped})\n"
                f"suggested lr: {self.suggested_lr:.3e}{steepest}")

    def plot(self, path: str | Path) -> Path:
        """Save the loss-vs-learning-rate curve as a PNG."""
        from .plots import plot_lr_finder

        return plot_lr_finder(self.lrs, self.losses, path, smoothed=self.smoothed_losses,
                              suggested_lr=self.suggested_lr,
                              title=f"learning rate range test ({self.optimizer})")


@dataclass
class TuneResult(_Result):
    """Outcome of :func:`tune`.

    Attributes
    ----------
    table : list of dict
        One row per configuration in grid order: ``optimizer``, ``lr``,
        ``batch_size``, ``mean_<metric>``, ``std_<metric>``, ``mean_val_loss``,
        ``time_s`` and ``rank`` (1 is best).
    best : dict
        The rank-1 row: highest mean validation metric, ties to the lower loss.
    metric_name : str
    k : int
        Number of folds.
    """

    table: list[dict[str, Any]]
    metric_name: str
    k: int

    @property
    def best(self) -> dict[str, Any]:
        return min(self.table, key=lambda row: row["rank"])

    @property
    def best_config(self) -> dict[str, Any]:
        """``optimizer``, ``lr`` and ``batch_size`` of the best row, ready for ``fit``."""
        return {key: self.best[key] for key in ("optimizer", "lr", "batch_size")}

    def to_dict(self) -> dict[str, Any]:
        return dict(kind="tune", metric=self.metric_name, k=self.k, best=self.best,
                    table=self.table)

    def format(self) -> str:
        ranked = sorted(self.table, key=lambda row: row["rank"])
        best = self.best
        return (format_table(ranked) + f"\n\nbest ({self.k}-fold mean {self.metric_name}): "
                f"optimizer={best['optimizer']} lr={best['lr']:g} "
                f"batch_size={best['batch_size']}")


@dataclass
class CompareResult(_Result):
    """Outcome of :func:`compare`.

    Attributes
    ----------
    table : list of dict
        One row per optimizer, in the order given: ``optimizer``, ``lr``,
        ``epochs``, ``train_loss``, ``val_loss``, ``val_<metric>`` (final epoch;
        ``train_<metric>`` without validation data), ``time_s``.
    histories : dict of label -> History
        The full per-epoch record of each run.
    metric_name : str
    warmup_s : dict of label -> float
        Wall time of each run's warm-up (where one-time compilation happens), which
        ``time_s`` does not include.
    """

    table: list[dict[str, Any]]
    histories: dict[str, Any] = field(repr=False)
    metric_name: str = "metric"
    warmup_s: dict[str, float] = field(default_factory=dict)

    @property
    def best(self) -> dict[str, Any]:
        """The row with the best final metric (validation where there is some)."""
        key = f"val_{self.metric_name}"
        if all(row.get(key) is None for row in self.table):
            key = f"train_{self.metric_name}"
        return min(self.table, key=lambda row: _higher_first(row.get(key)))

    def to_dict(self) -> dict[str, Any]:
        return dict(kind="compare", metric=self.metric_name, best=self.best, table=self.table,
                    warmup_s=dict(self.warmup_s),
                    histories={label: list(_epochs(h)) for label, h in self.histories.items()})

    def format(self) -> str:
        note = ""
        if self.warmup_s:
            note = (f"\n(time_s after a {WARMUP_STEPS}-step warm-up per optimizer, where "
                    f"kernels compile: {sum(self.warmup_s.values()):.2f} s in all)")
        return format_table(self.table) + note + f"\n\nbest: {self.best['optimizer']}"

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Save the loss curves of every optimizer as a PNG."""
        from .plots import plot_loss_curves

        return plot_loss_curves(self.histories, path, title=title, metric_name=self.metric_name)


# ----------------------------------------------------------------------------- helpers

def _epochs(history: Any) -> list[dict[str, Any]]:
    return [dict(row) for row in history.epochs]


def _fresh_model(model: Any) -> Any:
    """A model with the starting parameters: a deep copy, or a new one from a factory."""
    if hasattr(model, "loss"):
        return copy.deepcopy(model)
    if callable(model):
        return model()
    raise TypeError(f"model must be a model or a callable returning one, got "
                    f"{type(model).__name__}")


def _fit() -> Callable[..., Any]:
    from ..train.fit import fit

    return fit


def _check_grid_options(optimizers: Sequence[str], fit: Callable[..., Any],
                        fit_kwargs: Mapping[str, Any]) -> None:
    """TypeError/ValueError, before anything trains, if an optimizer of the grid rejects
    the optimizer keywords shared by every run (``momentum`` given to Adam, say)."""
    from ..train.fit import make_optimizer

    fit_parameters = inspect.signature(fit).parameters
    shared = {key: value for key, value in fit_kwargs.items() if key not in fit_parameters}
    for name in optimizers:
        try:
            make_optimizer(name, {"w": np.zeros(1)},
                           weight_decay=fit_kwargs.get("weight_decay"), **shared)
        except (TypeError, ValueError) as error:
            raise type(error)(f"optimizer {name!r} of the grid, with {sorted(shared)}: "
                              f"{error}") from None


def _check_optimizer_name(name: Any) -> None:
    from ..train.fit import OPTIMIZERS

    if not isinstance(name, str) or name.lower() not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(sorted(OPTIMIZERS))}")


def _run_spec(spec: str | Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """(label, fit keyword arguments) of one entry of ``optimizers``."""
    if isinstance(spec, str):
        _check_optimizer_name(spec)
        return spec, {"optimizer": spec}
    if not isinstance(spec, Mapping) or "optimizer" not in spec:
        raise ValueError(f"each optimizer must be a name or a dict with an 'optimizer' key, "
                         f"got {spec!r}")
    kwargs = dict(spec)
    label = kwargs.pop("label", None)
    _check_optimizer_name(kwargs["optimizer"])
    if label is None:
        label = kwargs["optimizer"] + ("" if kwargs.get("lr") is None else f":{kwargs['lr']:g}")
    return str(label), kwargs


def _take(x: Any, index: np.ndarray) -> Any:
    """Rows ``index`` (host integers) of ``x``, on ``x``'s own library and device."""
    if isinstance(x, np.ndarray):
        return x[index]
    xp = ns.namespace_of(x)
    return xp.take(x, xp.asarray(index, device=ns.device_of(x)), axis=0)


def _float(value: Any) -> float:
    return float(ns.to_numpy(value)) if not isinstance(value, (int, float)) else float(value)


def _kfold(n: int, k: int, labels: np.ndarray | None, rng: np.random.Generator
           ) -> list[np.ndarray]:
    """k disjoint validation index sets covering ``range(n)``, in a random order drawn
    from ``rng``: scikit-learn's ``StratifiedKFold`` given labels, else ``KFold``."""
    model_selection = require("sklearn.model_selection", "k-fold cross-validation (tune)")
    seed = int(rng.integers(0, 2**31 - 1))
    if labels is None:
        splitter = model_selection.KFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = model_selection.StratifiedKFold(n_splits=k, shuffle=True,
                                                   random_state=seed)
    return [held_out for _, held_out in splitter.split(np.zeros((n, 1)), labels)]


#: Steps of the warm-up run before a timed one: enough for every specialization a run
#: compiles (the first step's, the later steps', RAdam's rectified form from step 6).
WARMUP_STEPS = 8
# Arguments of fit that a warm-up leaves out: they have state, or write files.
_NOT_WARMED = ("callbacks", "schedule", "checkpoint", "checkpoint_every", "resume",
               "validation_data")


def _warm_up(fit: Callable[..., Any], model: Any, X: Any, y: Any, batch_size: int | None,
             seed: int | None, kwargs: Mapping[str, Any]) -> float:
    """Train a fresh copy of ``model`` for :data:`WARMUP_STEPS` steps on the first rows.

    One-time work (compiling the optimizer's kernels for this dtype and these options,
    or loading them from the disk cache) then happens here, not in the run that is timed
    after it. Returns the warm-up's wall time in seconds.
    """
    n = int(X.shape[0])
    size = min(n, batch_size or 32)
    rows = min(n, WARMUP_STEPS * size)
    options = {key: value for key, value in kwargs.items() if key not in _NOT_WARMED}
    start = time.perf_counter()
    with np.errstate(all="ignore"):
        fit(_fresh_model(model), X[:rows, ...], y[:rows, ...], epochs=1, batch_size=size,
            shuffle=False, seed=seed, progress=False, **options)
    return time.perf_counter() - start


# ----------------------------------------------------------------------------- compare

def compare(model: Any, X: Any, y: Any, *,
            optimizers: Sequence[str | Mapping[str, Any]] = ("sgd", "adam"),
            epochs: int = 10, batch_size: int | None = 32,
            validation_data: tuple[Any, Any] | None = None, seed: int | None = 0,
            progress: bool = False, **fit_kwargs: Any) -> CompareResult:
    """Train the same model with several optimizers and tabulate the outcome.

    Every run starts from the same initial parameters, sees the same batches in
    the same order (same ``seed``) and is timed end to end, after a warm-up of
    :data:`WARMUP_STEPS` steps on a copy (timed apart, in
    :attr:`CompareResult.warmup_s`), so no run is charged the one-time compilation of
    kernels it shares with the others.

    Parameters
    ----------
    model : model or callable returning one
        Copied for every run (a factory is called once per run).
    X, y : arrays
        Training data.
    optimizers : sequence of str or dict
        An optimizer name (see ``optim_core.training.OPTIMIZERS``), or a dict with
        ``optimizer`` plus any :func:`~optim_core.fit` keyword (``lr``,
        ``momentum``, ``schedule``...) and an optional ``label``.
    epochs, batch_size, seed, progress
        Passed to :func:`~optim_core.fit` for every run.
    validation_data : (X_val, y_val), optional
        Scored after every epoch; the final validation metric picks :attr:`~CompareResult.best`.
    **fit_kwargs
        Further :func:`~optim_core.fit` arguments shared by every run; optimizer
        keywords among them must suit every optimizer of the grid (checked before any
        training).

    Returns
    -------
    CompareResult
        One table row per optimizer, the histories, and the best.

    Raises
    ------
    ValueError
        For an unknown optimizer name or duplicate labels, before anything is trained.
    """
    runs = [_run_spec(spec) for spec in optimizers]
    if not runs:
        raise ValueError("optimizers is empty")
    labels = [label for label, _ in runs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"duplicate optimizer labels {labels}; give each run a 'label'")
    fit = _fit()
    table, histories, warmup = [], {}, {}
    metric_name = "metric"
    fit_kwargs.setdefault("nonfinite", "propagate")
    bar = progress_bar(len(runs), "compare", "optimizer", progress)
    for label, run_kwargs in runs:
        if bar is not None:
            bar.set_postfix_str(label)
        trained = _fresh_model(model)
        metric_name = getattr(trained, "metric_name", metric_name)
        kwargs = {**fit_kwargs, **run_kwargs}
        warmup[label] = _warm_up(fit, model, X, y, batch_size, seed, kwargs)
        start = time.perf_counter()
        # A diverging optimizer is a finding to report (NaN losses), not a reason to stop.
        with np.errstate(all="ignore"):
            history = fit(trained, X, y, epochs=epochs, batch_size=batch_size,
                          validation_data=validation_data, seed=seed, progress=progress,
                          **kwargs)
        elapsed = time.perf_counter() - start
        if bar is not None:
            bar.update(1)
        histories[label] = history
        last = history.epochs[-1] if history.epochs else {}
        table.append({
            "optimizer": label,
            "lr": last.get("lr", kwargs.get("lr")),
            "epochs": len(history.epochs),
            "train_loss": last.get("train_loss"),
            f"train_{metric_name}": last.get("train_metric"),
            "val_loss": last.get("val_loss"),
            f"val_{metric_name}": last.get("val_metric"),
            "time_s": elapsed,
        })
    if bar is not None:
        bar.close()
    return CompareResult(table=table, histories=histories, metric_name=metric_name,
                         warmup_s=warmup)


# ----------------------------------------------------------------------------- tune

def tune(model: Any, X: Any, y: Any, *, optimizers: Sequence[str] = ("sgd", "adam"),
         lrs: Sequence[float] = (1e-3, 1e-2, 1e-1), batch_sizes: Sequence[int] = (32, 128),
         k: int = 3, epochs: int = 5, seed: int | None = 0, progress: bool = False,
         **fit_kwargs: Any) -> TuneResult:
    """Grid search over optimizer x learning rate x batch size with k-fold cross-validation.

    For every configuration the data is split into ``k`` folds (stratified by
    class for a classifier); the model is trained from the same initial
    parameters on ``k - 1`` folds and scored (``model.score``, higher is better,
    and ``model.loss``) on the held-out one. Configurations are ranked by mean
    validation score; a run whose loss is not finite scores as the worst.

    Parameters
    ----------
    model : model or callable returning one
    X, y : arrays
    optimizers : sequence of str
        Optimizer names.
    lrs : sequence of float
    batch_sizes : sequence of int
    k : int, default 3
        Number of folds, at least 2.
    epochs : int, default 5
        Training epochs of every fold.
    seed : int, default 0
        Seeds the fold assignment and every fit.
    progress : bool, default False
        A progress bar over the configurations.
    **fit_kwargs
        Further :func:`~optim_core.fit` arguments shared by every run; optimizer
        keywords among them must suit every optimizer of the grid (checked before any
        training).

    Returns
    -------
    TuneResult
        ``table`` (one row per configuration), ``best`` and ``best_config``.

    Raises
    ------
    ValueError
        For an empty grid, an unknown optimizer, a bad ``k`` or learning rate,
        before anything is trained.
    """
    for name in optimizers:
        _check_optimizer_name(name)
    if not optimizers or not lrs or not batch_sizes:
        raise ValueError("optimizers, lrs and batch_sizes must each be non-empty")
    lrs = [checks.number(f"learning rates (lrs[{i}])", lr, low=0.0, low_open=True)
           for i, lr in enumerate(lrs)]
    batch_sizes = [checks.integer(f"batch sizes (batch_sizes[{i}])", size, minimum=1)
                   for i, size in enumerate(batch_sizes)]
    n = int(X.shape[0])
    k = checks.integer("k", k, minimum=2)
    if k > n:
        raise ValueError(f"k must be an integer in [2, {n}], got {k!r}")
    fit = _fit()
    _check_grid_options(optimizers, fit, fit_kwargs)
    probe = _fresh_model(model)
    metric_name = getattr(probe, "metric_name", "score")
    labels = ns.to_numpy(y) if getattr(probe, "task", None) == "classification" else None
    folds = _kfold(n, k, labels, np.random.default_rng(seed))
    splits = [(np.setdiff1d(np.arange(n), held_out), held_out) for held_out in folds]
    grid = list(itertools.product(optimizers, lrs, batch_sizes))
    fit_kwargs.setdefault("nonfinite", "propagate")
    # One warm-up per optimizer, so the first configuration is not charged the compilation.
    for name in dict.fromkeys(optimizers):
        _warm_up(fit, model, X, y, int(batch_sizes[0]), seed,
                 {**fit_kwargs, "optimizer": name, "lr": float(lrs[0])})
    bar = progress_bar(len(grid), "tune", "config", progress)
    table = []
    for name, lr, batch_size in grid:
        if bar is not None:
            bar.set_postfix_str(f"{name} lr={lr:g} batch={batch_size}")
        scores, losses = [], []
        start = time.perf_counter()
        for train_index, val_index in splits:
            trained = _fresh_model(model)
            X_val, y_val = _take(X, val_index), _take(y, val_index)
            # Diverging configurations are part of the grid; their overflow is expected.
            with np.errstate(all="ignore"):
                fit(trained, _take(X, train_index), _take(y, train_index), optimizer=name,
                    lr=lr, epochs=epochs, batch_size=int(batch_size), seed=seed,
                    progress=False, **fit_kwargs)
                loss = _float(trained.loss(X_val, y_val))
                score = _float(trained.score(X_val, y_val)) if math.isfinite(loss) else math.nan
            scores.append(score)
            losses.append(loss)
        finite = all(math.isfinite(s) for s in scores)
        with np.errstate(all="ignore"):  # a blown-up, still finite score may overflow std
            spread = float(np.std(scores))
        table.append({
            "optimizer": name, "lr": float(lr), "batch_size": int(batch_size),
            f"mean_{metric_name}": float(np.mean(scores)) if finite else math.nan,
            f"std_{metric_name}": spread if finite else math.nan,
            "mean_val_loss": float(np.mean(losses)) if finite else math.nan,
            "time_s": time.perf_counter() - start,
        })
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    order = sorted(range(len(table)), key=lambda i: (
        _higher_first(table[i][f"mean_{metric_name}"]),
        _lower_first(table[i]["mean_val_loss"])))
    for rank, i in enumerate(order, start=1):
        table[i]["rank"] = rank
    return TuneResult(table=table, metric_name=metric_name, k=k)


# ----------------------------------------------------------------------------- lr_find

def lr_find(model: Any, X: Any, y: Any, *, optimizer: str = "adam", start_lr: float = 1e-6,
            end_lr: float = 10.0, num_steps: int = 100, batch_size: int | None = 32,
            smoothing: float = 0.98, diverge_factor: float = 4.0, seed: int | None = 0,
            progress: bool = False, **optimizer_kwargs: Any) -> LRFinderResult:
    r"""Learning rate range test: suggest a learning rate for ``optimizer`` on this problem.

    Trains a copy of the model for ``num_steps`` mini-batch steps with the
    learning rate growing geometrically from ``start_lr`` to ``end_lr``,
    :math:`\gamma_i = \gamma_0 (\gamma_1/\gamma_0)^{i/(N-1)}`, and records each
    batch's loss (before its step). The losses are smoothed by an exponential
    moving average with bias correction (``smoothing`` is its factor); the test
    stops early when the smoothed loss exceeds ``diverge_factor`` times its
    minimum or a loss is not finite. The suggestion is the learning rate at the
    smoothed minimum divided by 10 (Smith, WACV 2017; as ``fastai``'s
    ``lr_min``), never below ``start_lr``. The caller's model is not changed.

    Parameters
    ----------
    model : model or callable returning one
    X, y : arrays
    optimizer : str
        An optimizer name (``optim_core.training.OPTIMIZERS``).
    start_lr, end_lr : float
        The range, ``0 < start_lr < end_lr``.
    num_steps : int, default 100
        Steps from ``start_lr`` to ``end_lr``, at least 2; the data is cycled through
        as often as needed, in :func:`~optim_core.fit`'s batch order for ``seed``.
    batch_size : int or None, default 32
        None takes the whole data set each step.
    smoothing : float in [0, 1), default 0.98
    diverge_factor : float > 1, default 4
    seed : int, default 0
        Seeds the initial parameters (of a model without any), batch order and dropout.
    progress : bool, default False
        A progress bar over the steps.
    **optimizer_kwargs
        Further hyperparameters of the optimizer (``momentum=0.9``...).

    Returns
    -------
    LRFinderResult
        ``lrs``, ``losses``, ``smoothed_losses``, ``suggested_lr``, ``table``.

    Raises
    ------
    ValueError
        For an unknown optimizer or a bad range, count or factor, before anything runs.
    """
    from ..train.fit import epoch_order, make_optimizer

    _check_optimizer_name(optimizer)
    start_lr = checks.number("start_lr", start_lr, low=0.0, low_open=True)
    end_lr = checks.number("end_lr", end_lr, low=0.0, low_open=True)
    if not start_lr < end_lr:
        raise ValueError(f"start_lr ({start_lr!r}) must be below end_lr ({end_lr!r})")
    num_steps = checks.integer("num_steps", num_steps, minimum=2)
    if batch_size is not None:
        batch_size = checks.integer("batch_size", batch_size, minimum=1)
    smoothing = checks.number("smoothing", smoothing, low=0.0, high=1.0, high_open=True)
    diverge_factor = checks.number("diverge_factor", diverge_factor, low=1.0, low_open=True)

    trained = _fresh_model(model)
    seed = 0 if seed is None else seed
    if trained.params is None:
        trained.init_params(X, seed=seed)
    opt = make_optimizer(optimizer, trained.params, lr=float(start_lr), nonfinite="propagate",
                         **optimizer_kwargs)
    n = int(X.shape[0])
    size = n if batch_size is None else min(batch_size, n)
    per_epoch = -(-n // size)
    growth = (end_lr / start_lr) ** (1.0 / (num_steps - 1))
    dropout_rng = np.random.default_rng([seed, 2])
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    average, best, diverged = 0.0, math.inf, False
    order = None
    bar = progress_bar(num_steps, "lr_find", "step", progress)
    for step in range(num_steps):
        epoch, position = divmod(step, per_epoch)
        if position == 0:
            order = epoch_order(seed, epoch + 1, n)
        index = order[position * size:(position + 1) * size]
        lr = start_lr * growth ** step
        for group in opt.param_groups:
            group["lr"] = lr
        # Past the useful range the loss overflows on purpose; that is how the test ends.
        with np.errstate(all="ignore"):
            loss, grads = trained.loss_and_grad(_take(X, index), _take(y, index),
                                                rng=dropout_rng)
            if not math.isfinite(loss):
                diverged = True
                break
            opt.step(grads)
        trained.params = opt.params
        average = smoothing * average + (1 - smoothing) * loss
        smooth = average / (1 - smoothing ** (step + 1))
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(smooth)
        best = min(best, smooth)
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"lr={lr:.2e} loss={smooth:.4g}")
        if smooth > diverge_factor * best:
            diverged = True
            break
    if bar is not None:
        bar.close()
    if len(lrs) < 2:
        raise ValueError(f"the loss diverged at the first steps (lr {start_lr:g}); "
                         f"lower start_lr")
    lowest = int(np.argmin(smoothed))
    suggested = max(lrs[lowest] / 10.0, float(start_lr))
    steepest = None
    # The first steps are dominated by batch noise and the average warming up; skip them.
    skip = min(10, num_steps // 10)
    if lowest - skip >= 2:
        slope = np.gradient(np.asarray(smoothed[skip:lowest + 1]),
                            np.log10(lrs[skip:lowest + 1]))
        steepest = lrs[skip + int(np.argmin(slope))]
    return LRFinderResult(lrs=lrs, losses=losses, smoothed_losses=smoothed,
                          suggested_lr=suggested, steepest_lr=steepest, diverged=diverged,
                          optimizer=optimizer.lower())
