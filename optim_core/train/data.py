r"""Data adapters: what :func:`~optim_core.fit` and the models do with the data they are given.

The kind of data is decided here, once per call, by :func:`adapter`:

* :class:`ArrayData`: arrays held in memory by any array API library (NumPy, CuPy,
  torch, JAX, array_api_strict...). Mini-batches are gathered on the data's device
  (``xp.take`` with an index array moved there once per epoch); a batch's loss and
  gradient are one call of the model's own array API code.
* :class:`~optim_core.train.dask_data.DaskData`: Dask arrays, whose chunks are
  computed where they are and reduced in a tree (see :mod:`optim_core.train.dask_data`).

Both have the same methods, so the code that uses them never asks which it has:

``batches(batch_size, shuffle, rng)``
    the epoch's mini-batches ``(X_b, y_b)``, shuffled by the epoch's generator;
``loss_and_grad(model, params, X_b, y_b, key=..., need_grad=..., count_correct=...)``
    ``(loss, grads, correct)``: the batch's mean loss (a 0-d array of the parameters'
    library), gradients keyed like ``params`` (or None) and, for classifiers, the
    number of correct labels from the same forward pass;
``loss``, ``score``, ``evaluate`` (both from one pass where the kind allows it),
``outputs`` (the model's raw outputs; lazy for Dask) and ``spread``
    on the whole data, without dropout.

Only :func:`adapter` and :func:`param_like` look at the kind of an array; Dask itself
is imported only when a Dask array appears.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import _namespace as ns
from .metrics import outputs_per_sample, r2

if TYPE_CHECKING:
    from .dask_data import DaskData

__all__ = ["adapter", "param_like", "ArrayData"]


def adapter(X: Any, y: Any = None, *, what: str = "") -> ArrayData | DaskData:
    """The data adapter for ``X`` (and ``y``): Dask data when either is a Dask array.

    Parameters
    ----------
    X, y : arrays
        Features and (optionally) targets, of one library and device.
    what : str
        Suffix naming them in messages (``"_val"`` gives ``X_val``, ``y_val``).

    Raises
    ------
    TypeError
        If they are not arrays of one library and device (or, for Dask, not both Dask).
    ImportError
        For Dask arrays without a usable Dask, naming the extra to install.
    """
    if ns.is_dask_array(X) or (y is not None and ns.is_dask_array(y)):
        from .dask_data import DaskData

        return DaskData(X, y, what=what)
    return ArrayData(X, y, what=what)


def param_like(x: Any) -> Any:
    """The array whose library and device parameters trained on data like ``x`` take.

    ``x`` itself, or for a Dask array an empty array of its chunks' library (NumPy,
    CuPy): parameters live in memory, never as Dask arrays.
    """
    if ns.is_dask_array(x):
        from .dask_data import chunk_like

        return chunk_like(x)
    return x


class ArrayData:
    """Features ``X`` and targets ``y`` (optional) in memory, in one array API library.

    Parameters
    ----------
    X, y : arrays
        Of one namespace and device (checked).
    what : str
        Suffix naming them in messages.
    """

    #: Whether results computed from this data are lazy (Dask's are).
    lazy = False

    def __init__(self, X: Any, y: Any = None, *, what: str = "", xp: Any = None) -> None:
        if xp is None:
            arrays = [X] if y is None else [X, y]
            xp = ns.common_namespace(arrays, [f"X{what}", f"y{what}"][:len(arrays)],
                                     what="array")
        self.X, self.y, self.xp, self.what = X, y, xp, what
        self.device = ns.device_of(X)
        self._spread: float | None = None

    @property
    def n_samples(self) -> int:
        return int(self.X.shape[0])

    def param_like(self) -> Any:
        """The array parameters for this data are created like (:func:`param_like`)."""
        return self.X

    def check_library(self, param: Any) -> None:
        """TypeError unless ``param`` is of the data's library and on its device."""
        ns.check_same_library(self.X, param, f"X{self.what}")

    def in_dtype(self, model: Any, dtype: Any) -> ArrayData:
        """The same data with ``X`` in ``dtype`` and ``y`` as ``model`` computes on it."""
        X = self.X if self.X.dtype == dtype else self.xp.astype(self.X, dtype)
        y = None if self.y is None else model.prepare_targets(self.xp, self.y, dtype)
        return ArrayData(X, y, what=self.what, xp=self.xp)

    # ------------------------------------------------------------------ training
    def batches(self, batch_size: int | None, shuffle: bool,
                rng: np.random.Generator) -> Iterator[tuple[Any, Any]]:
        """The epoch's mini-batches: contiguous slices, or gathered in ``rng``'s order.

        ``batch_size=None`` (or at least the number of samples) gives the whole data
        once. A shuffled epoch costs one host-to-device transfer of the order; each
        batch is gathered on the device.
        """
        X, y, xp = self.X, self.y, self.xp
        n_samples = self.n_samples
        if batch_size is None or batch_size >= n_samples:
            yield X, y
            return
        if shuffle:
            order = xp.asarray(rng.permutation(n_samples), dtype=xp.int64, device=self.device)
            for start in range(0, n_samples, batch_size):
                index = order[start:min(start + batch_size, n_samples)]
                yield xp.take(X, index, axis=0), xp.take(y, index, axis=0)
        else:
            for start in range(0, n_samples, batch_size):
                stop = min(start + batch_size, n_samples)
                yield X[start:stop, ...], y[start:stop, ...]

    def loss_and_grad(self, model: Any, params: Mapping[str, Any], X: Any, y: Any, *,
                      key: int | None, need_grad: bool = True,
                      count_correct: bool = False) -> tuple[Any, Any, Any]:
        """``(loss, grads or None, correct or None)`` of one batch, from one forward pass.

        ``key`` None means no dropout. Nothing is checked: the batch comes from
        :meth:`batches` of data already in the parameters' dtype.
        """
        loss, grads, outputs = model.loss_terms(self.xp, params, X, y, key=key,
                                                need_grad=need_grad)
        correct = model.count_correct(self.xp, outputs, y) if count_correct else None
        return loss, grads, correct

    # ------------------------------------------------------------------ evaluation
    def loss(self, model: Any, params: Mapping[str, Any]) -> float:
        """The mean loss on the whole data (no dropout), as a Python float."""
        return float(model.loss_terms(self.xp, params, self.X, self.y, key=None,
                                      need_grad=False)[0])

    def outputs(self, model: Any, params: Mapping[str, Any]) -> Any:
        """The model's raw outputs (predictions or logits) on ``X``."""
        return model.forward(self.xp, params, self.X)

    def score(self, model: Any, params: Mapping[str, Any]) -> float:
        """Accuracy (classifiers) or :math:`R^2` (regression) on the whole data."""
        xp, X, y = self.xp, self.X, self.y
        predictions = model.predictions(xp, model.forward(xp, params, X))
        if model.task == "classification":
            return float(xp.mean(xp.astype(predictions == y, X.dtype)))
        residual = float(xp.sum((y - predictions) ** 2))
        return r2(residual, self.spread())

    def evaluate(self, model: Any, params: Mapping[str, Any]) -> tuple[float, float]:
        """``(loss, metric)`` from one forward pass (no dropout)."""
        loss, _, outputs = model.loss_terms(self.xp, params, self.X, self.y, key=None,
                                            need_grad=False)
        loss = float(loss)
        if model.task == "classification":
            return loss, float(model.count_correct(self.xp, outputs, self.y)) / self.n_samples
        return loss, r2(loss * self.n_samples * outputs_per_sample(self.y), self.spread())

    def spread(self) -> float:
        """Sum of squared deviations of the (regression) targets from their mean, once."""
        if self._spread is None:
            xp, y = self.xp, self.y
            self._spread = float(xp.sum((y - xp.mean(y, axis=0)) ** 2))
        return self._spread
