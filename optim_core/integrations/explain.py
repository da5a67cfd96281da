r"""Explanations of the bundled models: which inputs a prediction rests on.

The founding article's FAQ 6.9 (interpretability) suggests explanation algorithms
such as LIME and SHAP. The bundled models have exact analytic input gradients
(:meth:`~optim_core.models.Model.input_gradient`), so gradient attributions cost one
backward pass per point:

* :func:`saliency`: :math:`|\partial f / \partial x|` (Simonyan, Vedaldi & Zisserman,
  2014), or gradient times input;
* :func:`integrated_gradients` (Sundararajan, Taly & Yan, ICML 2017):

  .. math:: \mathrm{IG}_i(x) = (x_i - x'_i)\int_0^1
     \frac{\partial f(x' + \alpha (x - x'))}{\partial x_i}\,d\alpha,

  whose attributions sum to :math:`f(x) - f(x')` (completeness), computed here with
  Gauss-Legendre quadrature;
* :func:`permutation_importance`: scikit-learn's model-agnostic permutation
  importance (Breiman, 2001), on a bundled model or an estimator;
* :func:`plot_attribution_maps`: attributions of image inputs (the digits' 8x8) as heat
  maps, in a PNG.

Model-agnostic explainers (``shap``'s KernelExplainer, LIME) work on the scikit-learn
estimators of :mod:`optim_core.sklearn` unchanged. ``f`` is a model's output for one
target: a class's probability (``output="probability"``, the default, as in
Sundararajan et al.) or its logit (``output="logit"``), or a regression output.

Completeness on digits (the MLPs of ``notebooks/09_compress_and_explain.ipynb``, every
test image of three splits): with the default 64 Gauss-Legendre nodes the attributions of
the predicted class's probability sum to :math:`f(x) - f(0)` within 0.51% for every image
(median 0.07%). Logits of
a ReLU network are piecewise linear along the path, which no quadrature integrates
exactly at its kinks: their errors are as small at the median (0.04%) but reach a few
percent for some images; raise ``steps`` for them.

scikit-learn and matplotlib are imported by the functions that need them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .. import _checks as checks
from .. import _namespace as ns
from ..train.extras import require
from ..train.models import Model

__all__ = ["model_output", "saliency", "integrated_gradients", "permutation_importance",
           "plot_attribution_maps", "OUTPUTS", "METHODS"]

#: What ``f`` is for a classifier.
OUTPUTS = ("probability", "logit")
#: Quadrature rules of :func:`integrated_gradients`.
METHODS = ("gausslegendre", "riemann_middle", "riemann_trapezoid")
# Input elements (path points x features) evaluated at once by integrated_gradients.
_ELEMENTS_PER_PASS = 1 << 22


def _prepared(model: Any, X: Any) -> tuple[Any, Any]:
    if not isinstance(model, Model):
        raise TypeError(f"model must be an optim_core.models.Model, got {type(model).__name__}")
    data = model.prepare(X)
    if data.lazy:
        raise TypeError("explanations take in-memory arrays, not Dask arrays")
    return data.xp, data.X


def _resolve_target(model: Model, xp: Any, X: Any, outputs: Any, target: Any) -> Any:
    """The target index per sample (device integers), or None for a single output."""
    if outputs.ndim == 1:
        if model.task == "regression":
            if target not in (None, 0):
                raise ValueError(f"{type(model).__name__} has one output: target must be None")
            return None
        if target is None:  # binary logistic regression: the predicted class
            return model.predictions(xp, outputs)
    elif target is None:
        if model.task == "regression":
            raise ValueError("a multi-output regression needs target= (the output's index)")
        return model.predictions(xp, outputs)
    n_outputs = 2 if outputs.ndim == 1 else int(outputs.shape[1])
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        target = checks.integer("target", target, minimum=0)
        if target >= n_outputs:
            raise ValueError(f"target must be below {n_outputs}, got {target}")
        return xp.full((X.shape[0],), target, dtype=xp.int64, device=ns.device_of(X))
    if not hasattr(target, "__array_namespace__"):
        target = np.asarray(target)
    if ns.namespace_of(target) is not xp:
        if not isinstance(target, np.ndarray):
            raise TypeError("target must be in the data's array library (or NumPy)")
        target = xp.asarray(target, device=ns.device_of(X), copy=True)
    if tuple(target.shape) != (X.shape[0],):
        raise ValueError(f"target must be an int or one index per sample, got shape "
                         f"{tuple(target.shape)}")
    if not xp.isdtype(target.dtype, "integral"):
        raise TypeError(f"target must hold integers, got dtype {target.dtype}")
    if X.shape[0] and (int(xp.min(target)) < 0 or int(xp.max(target)) >= n_outputs):
        raise ValueError(f"target indices must be in [0, {n_outputs})")
    return xp.astype(target, xp.int64)


def _one_hot(xp: Any, target: Any, n: int, dtype: Any) -> Any:
    classes = xp.arange(n, dtype=target.dtype, device=ns.device_of(target))
    return xp.astype(xp.reshape(target, (-1, 1)) == xp.reshape(classes, (1, -1)), dtype)


def _f_and_seed(model: Model, xp: Any, outputs: Any, target: Any,
                output: str) -> tuple[Any, Any]:
    """``f`` per sample and the seed :math:`\\partial f / \\partial \\text{outputs}`."""
    dtype = outputs.dtype
    if outputs.ndim == 1:
        if target is None:  # single-output regression
            return outputs, xp.ones_like(outputs)
        sign = xp.astype(target, dtype) * 2.0 - 1.0  # class 1: z; class 0: -z
        if output == "logit":
            return sign * outputs, sign
        p1 = model.probabilities(xp, outputs)[:, 1]
        f = xp.where(target == 1, p1, 1.0 - p1)
        return f, sign * p1 * (1.0 - p1)
    onehot = _one_hot(xp, target, outputs.shape[1], dtype)
    if model.task == "regression" or output == "logit":
        return xp.sum(outputs * onehot, axis=1), onehot
    p = model.probabilities(xp, outputs)
    f = xp.sum(p * onehot, axis=1)
    return f, xp.reshape(f, (-1, 1)) * (onehot - p)


def model_output(model: Model, X: Any, target: Any = None, *, output: str = "probability") -> Any:
    """``f(X)``: per sample, the output the attributions explain (see the module).

    ``target``: a class (or output) index, one per sample, or None for the predicted
    class (a single-output regression needs none).
    """
    checks.choice("output", output, OUTPUTS)
    xp, X = _prepared(model, X)
    outputs = model.forward(xp, model.params, X)
    target = _resolve_target(model, xp, X, outputs, target)
    return _f_and_seed(model, xp, outputs, target, output)[0]


def saliency(model: Model, X: Any, target: Any = None, *, output: str = "probability",
             absolute: bool = True, times_input: bool = False) -> Any:
    r"""Gradient attributions :math:`\partial f(x) / \partial x` of each sample.

    Parameters
    ----------
    model : Model
        A trained bundled model.
    X : array ``(n_samples, n_features)``
    target : int or array of ints, optional
        The class (output) explained per sample; None: the predicted class.
    output : {"probability", "logit"}
        For classifiers: explain the target's probability or its logit.
    absolute : bool
        :math:`|\partial f/\partial x|`, the saliency map of Simonyan et al. (2014).
    times_input : bool
        Gradient times input :math:`x \odot \partial f/\partial x` (then ``absolute``
        is not applied).

    Returns
    -------
    array of ``X``'s shape, in the model's array library
    """
    checks.choice("output", output, OUTPUTS)
    absolute, times_input = checks.boolean("absolute", absolute), \
        checks.boolean("times_input", times_input)
    xp, X = _prepared(model, X)
    params = model.params
    outputs = model.forward(xp, params, X)
    target = _resolve_target(model, xp, X, outputs, target)
    seed = _f_and_seed(model, xp, outputs, target, output)[1]
    gradient = model.input_gradient(xp, params, X, seed)
    if times_input:
        return X * gradient
    return xp.abs(gradient) if absolute else gradient


def _quadrature(method: str, steps: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes in [0, 1] and weights summing to 1."""
    if method == "gausslegendre":
        nodes, weights = np.polynomial.legendre.leggauss(steps)
        return (nodes + 1.0) / 2.0, weights / 2.0
    if method == "riemann_middle":
        return (np.arange(steps) + 0.5) / steps, np.full(steps, 1.0 / steps)
    if steps < 2:
        raise ValueError("riemann_trapezoid needs steps >= 2")
    weights = np.full(steps, 1.0 / (steps - 1))
    weights[[0, -1]] /= 2.0
    return np.linspace(0.0, 1.0, steps), weights


def _baseline(xp: Any, X: Any, baseline: Any) -> Any:
    if baseline is None:
        return xp.zeros_like(X)
    if isinstance(baseline, (int, float, np.number)) and not isinstance(baseline, bool):
        return xp.full(X.shape, float(baseline), dtype=X.dtype, device=ns.device_of(X))
    if not hasattr(baseline, "shape"):
        baseline = np.asarray(baseline)
    if ns.namespace_of(baseline) is not xp:
        if not isinstance(baseline, np.ndarray):
            raise TypeError("baseline must be in the data's array library (or NumPy/a number)")
        baseline = ns.from_numpy(xp, baseline, like=X)
    baseline = xp.astype(baseline, X.dtype)
    if tuple(baseline.shape) == (X.shape[1],):
        baseline = xp.reshape(baseline, (1, -1))
    elif tuple(baseline.shape) != tuple(X.shape):
        raise ValueError(f"baseline must be a number, one sample of {X.shape[1]} features or "
                         f"an array of X's shape {tuple(X.shape)}; got {tuple(baseline.shape)}")
    return baseline + xp.zeros_like(X)


def integrated_gradients(model: Model, X: Any, baseline: Any = None, *, target: Any = None,
                         steps: int = 64, method: str = "gausslegendre",
                         output: str = "probability", return_delta: bool = False) -> Any:
    r"""Integrated gradients (Sundararajan, Taly & Yan, ICML 2017) of each sample.

    .. math:: \mathrm{IG}_i(x) = (x_i - x'_i)\sum_j w_j\,
       \frac{\partial f}{\partial x_i}\big(x' + \alpha_j (x - x')\big)

    with the nodes :math:`\alpha_j` and weights :math:`w_j` of ``method`` on
    :math:`[0, 1]`. Completeness: :math:`\sum_i \mathrm{IG}_i(x) = f(x) - f(x')` up to
    the quadrature's error (``return_delta`` gives it per sample).

    Parameters
    ----------
    model : Model
        A trained bundled model (analytic input gradients; no autodiff needed).
    X : array ``(n_samples, n_features)``
    baseline : None, number, or array of one sample or of ``X``'s shape
        :math:`x'`; None is all zeros (for digits, a black image).
    target : int or array of ints, optional
        The class (output) explained; None: the class predicted at ``x``.
    steps : int
        Quadrature nodes per sample (the paper uses 20 to 300).
    method : {"gausslegendre", "riemann_middle", "riemann_trapezoid"}
    output : {"probability", "logit"}
        For classifiers: :math:`f` is the target's probability or its logit.
    return_delta : bool
        Also return :math:`\sum_i \mathrm{IG}_i - (f(x) - f(x'))` per sample.

    Returns
    -------
    array of ``X``'s shape (and the deltas, shape ``(n_samples,)``)
    """
    checks.choice("output", output, OUTPUTS)
    checks.choice("method", method, METHODS)
    steps = checks.integer("steps", steps, minimum=1)
    return_delta = checks.boolean("return_delta", return_delta)
    xp, X = _prepared(model, X)
    params = model.params
    base = _baseline(xp, X, baseline)
    outputs = model.forward(xp, params, X)
    target = _resolve_target(model, xp, X, outputs, target)
    nodes, weights = _quadrature(method, steps)
    device = ns.device_of(X)
    alphas = xp.asarray(nodes, dtype=X.dtype, device=device)
    weights = xp.asarray(weights, dtype=X.dtype, device=device)
    n, n_features = int(X.shape[0]), int(X.shape[1])
    diff = X - base
    chunk = max(1, _ELEMENTS_PER_PASS // (steps * max(n_features, 1)))
    pieces = []
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        # (steps, m, features): the path points of samples start..stop, node by node.
        path = xp.reshape(base[start:stop, :], (1, m, n_features)) + \
            xp.reshape(alphas, (steps, 1, 1)) * xp.reshape(diff[start:stop, :], (1, m, n_features))
        path = xp.reshape(path, (steps * m, n_features))
        path_target = None if target is None else \
            xp.reshape(xp.broadcast_to(xp.reshape(target[start:stop], (1, m)), (steps, m)), (-1,))
        path_outputs = model.forward(xp, params, path)
        seed = _f_and_seed(model, xp, path_outputs, path_target, output)[1]
        gradient = xp.reshape(model.input_gradient(xp, params, path, seed),
                              (steps, m, n_features))
        average = xp.sum(gradient * xp.reshape(weights, (steps, 1, 1)), axis=0)
        pieces.append(diff[start:stop, :] * average)
    attributions = xp.concat(pieces, axis=0) if pieces else xp.zeros_like(X)
    if not return_delta:
        return attributions
    f_x = _f_and_seed(model, xp, outputs, target, output)[0]
    f_base = _f_and_seed(model, xp, model.forward(xp, params, base), target, output)[0]
    return attributions, xp.sum(attributions, axis=1) - (f_x - f_base)


class _FittedModel:
    """A trained bundled model as scikit-learn's permutation importance takes one."""

    def __init__(self, model: Any) -> None:
        self.model = model

    def fit(self, X: Any, y: Any) -> _FittedModel:  # never called: the model is trained
        raise NotImplementedError("the model is already trained")

    def predict(self, X: Any) -> Any:
        return self.model.predict(X)

    def score(self, X: Any, y: Any) -> float:
        return float(self.model.score(X, y))


def permutation_importance(model: Any, X: Any, y: Any, *, n_repeats: int = 5,
                           scoring: Any = None, random_state: Any = 0,
                           n_jobs: int | None = None) -> Any:
    """scikit-learn's permutation importance of each feature (Breiman, 2001).

    The drop of the score when one feature's column is shuffled, ``n_repeats`` times.

    Parameters
    ----------
    model : Model, QuantizedModel or scikit-learn estimator
        A bundled model (scored by its ``score``: accuracy or :math:`R^2`) or any fitted
        estimator (:class:`optim_core.sklearn.Classifier` ...).
    X, y : NumPy arrays (or what the estimator takes)
    n_repeats, scoring, random_state, n_jobs
        As :func:`sklearn.inspection.permutation_importance`.

    Returns
    -------
    sklearn.utils.Bunch
        ``importances_mean``, ``importances_std``, ``importances``.
    """
    inspection = require("sklearn.inspection", "permutation_importance")
    estimator = model if hasattr(model, "get_params") else _FittedModel(model)
    return inspection.permutation_importance(estimator, X, y, n_repeats=n_repeats,
                                             scoring=scoring, random_state=random_state,
                                             n_jobs=n_jobs)


def plot_attribution_maps(attributions: Any, path: str | Path, *, shape: tuple[int, int] = (8, 8),
                          images: Any = None, titles: Any = None, title: str | None = None,
                          columns: int | None = None) -> Path:
    """Save attributions of image inputs as heat maps in a PNG.

    Each row of ``attributions`` is drawn as a ``shape`` image in a diverging colour
    map centred at zero (red: the input raises ``f``; blue: it lowers it), each map
    with its own symmetric scale. With ``images``, each map is drawn under its image.

    Parameters
    ----------
    attributions : array ``(n_maps, shape[0] * shape[1])``
    path : str or Path
    shape : (int, int)
        Pixels of one image (the digits' 8x8).
    images : array like ``attributions``, optional
    titles : sequence of str, optional
        One per map.
    title : str, optional
    columns : int, optional
        Maps per row of the figure (default: all in one row, at most 10).

    Returns
    -------
    Path
    """
    maps = ns.to_numpy(attributions) if hasattr(attributions, "shape") else \
        np.asarray(attributions)
    maps = np.asarray(maps, dtype=np.float64)
    rows_px, cols_px = shape
    if maps.ndim != 2 or maps.shape[1] != rows_px * cols_px:
        raise ValueError(f"attributions must have shape (n_maps, {rows_px * cols_px}), got "
                         f"{maps.shape}")
    pictures = None if images is None else np.asarray(ns.to_numpy(images), dtype=np.float64)
    if pictures is not None and pictures.shape != maps.shape:
        raise ValueError(f"images must have the attributions' shape {maps.shape}")
    count = maps.shape[0]
    if titles is not None and len(titles) != count:
        raise ValueError(f"titles must have one entry per map ({count})")
    columns = min(count, 10) if columns is None else checks.integer("columns", columns,
                                                                     minimum=1)
    grid_rows = -(-count // columns) * (1 if pictures is None else 2)
    Figure = require("matplotlib.figure", "a plot").Figure
    FigureCanvasAgg = require("matplotlib.backends.backend_agg", "a plot").FigureCanvasAgg
    figure = Figure(figsize=(1.3 * columns, 1.4 * grid_rows + (0.4 if title else 0)), dpi=100,
                    layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(grid_rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    step = 1 if pictures is None else 2
    for i in range(count):
        row, col = (i // columns) * step, i % columns
        if pictures is not None:
            axes[row][col].imshow(pictures[i].reshape(shape), cmap="gray_r")
            if titles is not None:
                axes[row][col].set_title(str(titles[i]), fontsize=8)
        limit = float(np.max(np.abs(maps[i]))) or 1.0
        ax = axes[row + step - 1][col]
        ax.imshow(maps[i].reshape(shape), cmap="RdBu_r", vmin=-limit, vmax=limit)
        if titles is not None and pictures is None:
            ax.set_title(str(titles[i]), fontsize=8)
    if title:
        figure.suptitle(title)
    path = Path(path)
    figure.savefig(path)
    return path
