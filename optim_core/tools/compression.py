"""The founding article's FAQ on model size (6.13, 6.14), as experiments.

* :func:`prune_sweep`: a trained model fine-tuned under magnitude pruning
  (:class:`optim_core.pruning.MagnitudePruning`) at several sparsities: the metric, the
  weights left and the bytes the sparse model takes stored compressed
  (:func:`optim_core.pruning.save_sparse`), against the dense model.
* :func:`quantize_sweep`: a trained model quantized after training
  (:func:`optim_core.quantization.quantize`) at several bit widths: the metric and
  the bytes of the weights, against the float model.

Each returns a result with a ``table`` (flat dicts, one per row), ``format``,
``to_csv``, ``to_json`` and ``plot`` (a PNG of the metric against sparsity or bits),
as the other tools' results.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _checks as checks
from ..train import pruning, quantization
from ..train.extras import require
from ..train.fit import fit
from .experiments import _Result, format_table

__all__ = ["prune_sweep", "quantize_sweep", "PruneResult", "QuantizeResult"]


def _copy(model: Any) -> Any:
    if not hasattr(model, "params") or model.params is None:
        raise ValueError("model must be a trained model (it has no parameters)")
    return copy.deepcopy(model)


def _figure(width: float, height: float) -> Any:
    Figure = require("matplotlib.figure", "a plot").Figure
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "a plot").FigureCanvasAgg
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _plot_against(rows: list[dict[str, Any]], x_key: str, x_label: str, reference: float,
                  reference_label: str, metric_name: str, path: str | Path,
                  title: str | None, log_x: bool = False) -> Path:
    figure = _figure(7, 4.2)
    axes = figure.subplots()
    axes.plot([row[x_key] for row in rows], [row[metric_name] for row in rows], "o-",
              color="C0", label=metric_name)
    axes.axhline(reference, color="C3", linestyle="--", label=reference_label)
    axes.axhline(reference - 0.01, color="C3", linestyle=":", alpha=0.6,
                 label="1 point below")
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(x_label)
    axes.set_ylabel(f"test {metric_name}")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(title or f"{metric_name} against {x_label}")
    path = Path(path)
    figure.savefig(path, format="png")
    return path


# ----------------------------------------------------------------------------- pruning

@dataclass
class PruneResult(_Result):
    """Outcome of :func:`prune_sweep`.

    Attributes
    ----------
    table : list of dict
        One row per sparsity, the dense model first (sparsity 0): ``sparsity`` (asked),
        ``zeros`` (the share of the pruned weights that are zero), ``nonzero_weights``,
        the metric, ``change`` (against the dense model, in points of the metric),
        ``sparse_bytes`` (:func:`~optim_core.pruning.save_sparse`'s file),
        ``dense_bytes`` (the raw arrays) and ``ratio`` (dense / sparse).
    metric_name : str
    dense_metric : float
    scope, schedule : str
    epochs : int
        Fine-tuning epochs per sparsity.
    """

    table: list[dict[str, Any]]
    metric_name: str
    dense_metric: float
    scope: str
    schedule: str
    epochs: int

    def to_dict(self) -> dict[str, Any]:
        return dict(kind="prune", metric=self.metric_name, dense_metric=self.dense_metric,
                    scope=self.scope, schedule=self.schedule, epochs=self.epochs,
                    table=self.table)

    def format(self) -> str:
        return (f"magnitude pruning ({self.scope}, {self.schedule}), {self.epochs} "
                f"fine-tuning epochs per sparsity\n" + format_table(self.table))

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Save the metric against sparsity (the dense model's as a dashed line) as a PNG."""
        return _plot_against(self.table, "zeros", "sparsity (share of weights zero)",
                             self.dense_metric, "dense", self.metric_name, path, title)


def prune_sweep(model: Any, X: Any, y: Any, X_test: Any, y_test: Any, *,
                sparsities: Sequence[float] = (0.5, 0.8, 0.9, 0.95), scope: str = "global",
                gradual: bool = True, epochs: int = 20, optimizer: str = "adam",
                lr: float | None = None, batch_size: int | None = 32, seed: int = 0,
                progress: bool = False, **fit_kwargs: Any) -> PruneResult:
    """Fine-tune copies of a trained ``model`` under magnitude pruning, one per sparsity.

    Parameters
    ----------
    model : Model
        Trained (the dense reference); it is copied, never changed.
    X, y : arrays
        Training data for the fine-tuning.
    X_test, y_test : arrays
        Where the metric is measured.
    sparsities : sequence of float in (0, 1)
    scope : {"global", "layer"}
    gradual : bool
        Zhu & Gupta's schedule reaching the sparsity two thirds into the fine-tuning,
        pruning once an epoch; False: one-shot pruning at the first step.
    epochs : int
        Fine-tuning epochs per sparsity.
    optimizer, lr, batch_size, seed, progress, **fit_kwargs
        For :func:`~optim_core.fit`.

    Returns
    -------
    PruneResult
    """
    epochs = checks.integer("epochs", epochs, minimum=1)
    sparsities = [checks.number("sparsity", s, low=0.0, high=1.0, low_open=True,
                                high_open=True) for s in sparsities]
    checks.choice("scope", scope, pruning.SCOPES)
    gradual = checks.boolean("gradual", gradual)
    dense = _copy(model)
    weights = list(dense.regularized)
    dense_metric = float(dense.score(X_test, y_test))
    n_samples = int(X.shape[0])
    steps_per_epoch = 1 if batch_size is None else max(1, math.ceil(n_samples / batch_size))
    total_steps = steps_per_epoch * epochs

    def row(target: float, trained: Any) -> dict[str, Any]:
        params = trained.params
        sizes = pruning.storage_bytes(params)
        metric = float(trained.score(X_test, y_test))
        count = sum(math.prod(params[name].shape) for name in weights)
        zeros = pruning.sparsity(params, weights)
        return {"sparsity": target, "zeros": round(zeros, 4),
                "nonzero_weights": count - round(zeros * count), trained.metric_name: metric,
                "change": round(100 * (metric - dense_metric), 2),
                "sparse_bytes": sizes["sparse_compressed"], "dense_bytes": sizes["raw"],
                "ratio": round(sizes["raw"] / sizes["sparse_compressed"], 2)}

    table = [row(0.0, dense)]
    for target in sparsities:
        trained = _copy(model)
        if gradual and total_steps > 1:
            end = max(1, (2 * total_steps) // 3)
            pruner = pruning.MagnitudePruning(target, scope=scope, end_step=end,
                                              frequency=min(steps_per_epoch, end))
        else:
            pruner = pruning.MagnitudePruning(target, scope=scope)
        fit(trained, X, y, optimizer=optimizer, lr=lr, epochs=epochs, batch_size=batch_size,
            seed=seed, progress=progress, callbacks=[pruner], **fit_kwargs)
        table.append(row(target, trained))
    return PruneResult(table, dense.metric_name, dense_metric, scope,
                       "gradual (Zhu & Gupta)" if gradual else "one-shot", epochs)


# ----------------------------------------------------------------------------- quantization

@dataclass
class QuantizeResult(_Result):
    """Outcome of :func:`quantize_sweep`.

    Attributes
    ----------
    table : list of dict
        The float model first, then one row per bit width: ``weights`` (``float32``,
        ``int8``...), ``bits``, the metric, ``change`` (against the float model, in points),
        ``weight_bytes`` (packed at ``bits`` an entry), ``total_bytes`` (with scales and
        biases) and ``ratio`` (float weights' bytes / quantized weights' bytes).
    metric_name : str
    float_metric : float
    per_channel : bool
    activations : str
        "float", or "int8" (calibrated).
    """

    table: list[dict[str, Any]]
    metric_name: str
    float_metric: float
    per_channel: bool
    activations: str

    def to_dict(self) -> dict[str, Any]:
        return dict(kind="quantize", metric=self.metric_name, float_metric=self.float_metric,
                    per_channel=self.per_channel, activations=self.activations,
                    table=self.table)

    def format(self) -> str:
        return (f"post-training quantization, symmetric, "
                f"{'per output channel' if self.per_channel else 'per tensor'}, "
                f"{self.activations} activations\n" + format_table(self.table))

    def plot(self, path: str | Path, *, title: str | None = None) -> Path:
        """Save the metric against the weights' bits (the float model's dashed) as a PNG."""
        return _plot_against(self.table[1:], "bits", "bits per weight", self.float_metric,
                             self.table[0]["weights"], self.metric_name, path, title)


def quantize_sweep(model: Any, X_test: Any, y_test: Any, *, bits: Sequence[int] = (8, 6, 4, 3, 2),
                   per_channel: bool = True, calibration_data: Any = None) -> QuantizeResult:
    """Quantize a trained ``model`` at each bit width; measure the metric and the size.

    Parameters
    ----------
    model : Model
        Trained; it is not changed.
    X_test, y_test : arrays
    bits : sequence of int in [2, 8]
    per_channel : bool
    calibration_data : array, optional
        With it, activations are quantized to int8 too (calibrated on it).

    Returns
    -------
    QuantizeResult
    """
    float_metric = float(model.score(X_test, y_test))
    first = quantization.quantize(model, bits=8, per_channel=per_channel)
    sizes = first.nbytes()
    float_name = str(next(iter(model.params.values())).dtype).rsplit(".", 1)[-1]
    table = [{"weights": float_name, "bits": 8 * sizes["float_weights"] //
              max(1, sizes["weights_int8"]), model.metric_name: float_metric, "change": 0.0,
              "weight_bytes": sizes["float_weights"], "total_bytes": sizes["float_total"],
              "ratio": 1.0}]
    for width in bits:
        quantized = quantization.quantize(model, bits=width, per_channel=per_channel,
                                          calibration_data=calibration_data)
        size = quantized.nbytes()
        metric = float(quantized.score(X_test, y_test))
        table.append({"weights": f"int{width}", "bits": width, model.metric_name: metric,
                      "change": round(100 * (metric - float_metric), 2),
                      "weight_bytes": size["weights"], "total_bytes": size["total"],
                      "ratio": round(size["float_weights"] / size["weights"], 2)})
    return QuantizeResult(table, model.metric_name, float_metric, bool(per_channel),
                          "float" if calibration_data is None else "int8")
