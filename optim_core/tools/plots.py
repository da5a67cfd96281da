"""PNG plots of training runs: loss curves per optimizer and the LR finder curve.

matplotlib (the ``[train]`` extra) is imported when a plot is drawn, never with the
package, and each figure gets its own Agg canvas, so no global matplotlib backend is
changed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..train.extras import require

__all__ = ["plot_loss_curves", "plot_lr_finder"]


def _new_figure(width: float, height: float) -> Any:
    Figure = require("matplotlib.figure", "a plot").Figure
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "a plot").FigureCanvasAgg
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _epoch_rows(history: Any) -> Sequence[Mapping[str, Any]]:
    """The per-epoch records of a :class:`~optim_core.History` or a list of dicts."""
    return history.epochs if hasattr(history, "epochs") else history


def _finite(values: Sequence[Any]) -> bool:
    return any(v is not None and math.isfinite(v) for v in values)


def plot_loss_curves(histories: Mapping[str, Any], path: str | Path, *,
                     title: str | None = None, metric_name: str = "metric") -> Path:
    """Save training (solid) and validation (dashed) loss per epoch, one colour per run.

    A second panel shows the validation metric (the training metric where there
    is no validation data).

    Parameters
    ----------
    histories : mapping of label -> History (or list of per-epoch dicts)
        Each record has ``epoch``, ``train_loss`` and optionally ``val_loss``,
        ``val_metric``, ``train_metric``.
    path : str or Path
        Where to write the PNG.
    title : str, optional
    metric_name : str, default "metric"
        Label of the metric panel (e.g. "accuracy", "r2").

    Returns
    -------
    Path
        ``path``.
    """
    figure = _new_figure(11, 4.2)
    loss_axes, metric_axes = figure.subplots(1, 2)
    colours = [f"C{i}" for i in range(10)]
    metric_key = None
    for i, (label, history) in enumerate(histories.items()):
        rows = _epoch_rows(history)
        epochs = [row["epoch"] for row in rows]
        colour = colours[i % len(colours)]
        loss_axes.plot(epochs, [row["train_loss"] for row in rows], color=colour, label=label)
        val_loss = [row.get("val_loss") for row in rows]
        if _finite(val_loss):
            loss_axes.plot(epochs, val_loss, color=colour, linestyle="--")
        key = "val_metric" if _finite([row.get("val_metric") for row in rows]) else "train_metric"
        values = [row.get(key) for row in rows]
        if _finite(values):
            metric_key = key
            metric_axes.plot(epochs, values, color=colour, label=label)
    loss_axes.set_xlabel("epoch")
    loss_axes.set_ylabel("loss")
    loss_axes.set_yscale("log")
    loss_axes.grid(True, alpha=0.3)
    loss_axes.legend(fontsize="small")
    loss_axes.set_title("loss (solid: train, dashed: validation)")
    metric_axes.set_xlabel("epoch")
    which = "validation" if metric_key == "val_metric" else "train"
    metric_axes.set_ylabel(f"{which} {metric_name}")
    metric_axes.grid(True, alpha=0.3)
    if metric_key is not None:
        metric_axes.legend(fontsize="small")
    metric_axes.set_title(f"{which} {metric_name}")
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path, format="png")
    return path


def plot_lr_finder(lrs: Sequence[float], losses: Sequence[float], path: str | Path, *,
                   smoothed: Sequence[float] | None = None, suggested_lr: float | None = None,
                   title: str | None = None) -> Path:
    """Save the LR range test: loss against learning rate (log axis), suggestion marked.

    Parameters
    ----------
    lrs, losses : sequences of float
        The learning rate of each step and the batch loss it produced.
    path : str or Path
        Where to write the PNG.
    smoothed : sequence of float, optional
        Smoothed losses, drawn over the raw ones.
    suggested_lr : float, optional
        Drawn as a vertical line.
    title : str, optional

    Returns
    -------
    Path
        ``path``.
    """
    figure = _new_figure(7, 4.2)
    axes = figure.subplots()
    axes.plot(lrs, losses, color="C0", alpha=0.35, label="batch loss")
    if smoothed is not None:
        axes.plot(lrs, smoothed, color="C0", label="smoothed")
    finite = [v for v in (smoothed if smoothed is not None else losses) if math.isfinite(v)]
    if finite:
        # Diverging losses at the top end would flatten the interesting part.
        low, high = min(finite), max(finite)
        axes.set_ylim(low - 0.05 * (high - low + 1e-12), high + 0.05 * (high - low + 1e-12))
    if suggested_lr is not None:
        axes.axvline(suggested_lr, color="C3", linestyle="--",
                     label=f"suggested lr = {suggested_lr:.2e}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate")
    axes.set_ylabel("loss")
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize="small")
    axes.set_title(title or "learning rate range test")
    path = Path(path)
    figure.savefig(path, format="png")
    return path
