r"""Training on Dask arrays: data on a cluster (or on disk), parameters in memory.

:func:`optim_core.fit` and the models accept Dask arrays for ``X`` and ``y``. The
math is the models' own array API code, written once: on Dask data each chunk
runs it on its own library (NumPy, CuPy), and Dask sums the chunks' results.
What changes is only where things live:

* **Parameters and optimizer state** are small and stay in the driver's memory,
  as arrays of the chunks' library (NumPy, or CuPy for CuPy chunks, with
  dask-cuda). The optimizer steps them there with its usual (fused) path.
* **Each step** is one ``dask.compute``: the parameters enter the graph once, as
  a small constant; one task per chunk of the batch computes the chunk's loss
  and gradients (and, for classifiers, its correct labels) where the chunk is,
  weighted by its share of the rows; a tree of additions reduces them, and only
  the reduced gradients, of the parameters' size, come back. ``X`` is never
  gathered on one machine. :meth:`~optim_core.models.Model.loss` and
  :meth:`~optim_core.models.Model.score` work the same way;
  :meth:`~optim_core.models.Model.predict` returns a lazy Dask array.
* **Nothing is persisted by fit.** ``X`` and ``y`` stay what they are: persisted
  arrays (``X, y = dask.persist(X, y)`` or ``client.persist``) are read from the
  workers' memory at every step; lazy arrays (generated, or read from Zarr or
  ``.npy`` with :func:`read_npy`) are recomputed or re-read chunk by chunk at
  every step, and a worker holds only the few chunks it is working on. Persist
  when the data fits in the cluster's memory; leave it lazy when it does not
  (out-of-core). Besides the steps, a regression fit reads ``y`` once at the
  start (the targets' spread, for :math:`R^2`), and validation data is read
  twice per epoch (loss, then metric).
* **Where it runs** is Dask's choice: the ``distributed.Client`` that is active
  (``Client("tcp://scheduler:8786")`` for a remote cluster, ``LocalCluster``
  for worker processes on one machine), or Dask's local threads without one.
  Workers unpickle the model's class, so they need optim-core installed.

Full-batch training (``batch_size=None``) computes the same sums as NumPy in
another order, so results agree to rounding (float64: about 1e-15 relative per
step). Mini-batches without ``shuffle`` are the same contiguous slices as with
NumPy. Shuffled mini-batches are drawn **chunk by chunk**, not from one global
permutation: each epoch visits the chunks in a random order and the rows of
each chunk in a random order (both from ``(seed, epoch)``), and batches are
consecutive runs of that order, so a batch touches one or two chunks
(``batch_size`` / chunk rows + 1 at most) instead of every chunk. Rows of
different chunks meet in a batch only at chunk boundaries, so chunks should hold
rows in no particular order (shuffle once when writing the data, if it is sorted).
Dropout masks are drawn per chunk, so a model with dropout does not train on
NumPy's masks. Every step costs a round trip to the scheduler (milliseconds on
one machine): use large batches.

Dask is an optional dependency: ``pip install 'optim-core[dask]'``. It is
imported only when a Dask array appears (or a function here is called).
"""

from __future__ import annotations

import copy
import os
from typing import Any

import numpy as np

from .. import _checks as checks
from .. import _namespace as ns
from .metrics import r2
from .regularization import dropout_key

__all__ = ["INSTALL_HINT", "require_dask", "is_dask_array", "chunk_like", "DaskData",
           "epoch_order", "read_npy", "synthetic"]

#: The command that installs what this module needs.
INSTALL_HINT = "pip install 'optim-core[dask]'"
# array-api-compat's Dask namespace and the Generator API of dask.array.random need it.
_MIN_DASK = (2024, 1)
# Partial results summed per task of the reduction tree.
_FAN_IN = 8
# Mixed into a step's dropout key with the chunk's position.
_CHUNK_STREAM = 3


def require_dask() -> Any:
    """Import and return ``dask.array``, or raise ImportError saying what to install."""
    try:
        import dask
        import dask.array as da
    except ImportError as exc:
        raise ImportError(f"Dask arrays need Dask with its array extra: {INSTALL_HINT}") \
            from exc
    if _version(dask.__version__) < _MIN_DASK:
        raise ImportError(f"Dask {dask.__version__} is too old (optim-core needs "
                          f"{_MIN_DASK[0]}.{_MIN_DASK[1]} or newer): {INSTALL_HINT}")
    return da


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for word in text.split(".")[:2]:
        digits = "".join(ch for ch in word if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def is_dask_array(x: Any) -> bool:
    """Whether ``x`` is a Dask array (without importing Dask)."""
    return ns.is_dask_array(x)


def chunk_like(x: Any) -> Any:
    """An empty array of the library, device and dtype of ``x``'s chunks.

    Models keep their parameters in this library (NumPy, or CuPy for CuPy chunks).
    """
    require_dask()
    return x._meta


def check_data(X: Any, y: Any = None, what: str = "") -> None:
    """ValueError unless Dask ``X`` (and ``y``) have known chunk sizes along the samples.

    TypeError unless both are Dask arrays (``y`` may be None).
    """
    require_dask()
    pairs = [(f"X{what}", X)] + ([] if y is None else [(f"y{what}", y)])
    for name, array in pairs:
        if not is_dask_array(array):
            raise TypeError(f"X{what} and y{what} must both be Dask arrays, or neither; "
                            f"{name} is a {type(array).__module__}.{type(array).__name__}")
        if any(np.isnan(extent) for extent in array.shape):
            raise ValueError(f"{name} has chunks of unknown size (shape {array.shape}); "
                             f"call {name}.compute_chunk_sizes() first")


class DaskData:
    """Dask features ``X`` and targets ``y`` (optional): the data adapter of Dask arrays.

    The same methods as :class:`optim_core.train.data.ArrayData`; every computation
    is one ``dask.compute`` of a task per chunk and a tree of sums (see the module).

    Parameters
    ----------
    X, y : Dask arrays
        With known chunk sizes along the samples (checked), chunks of one library.
    what : str
        Suffix naming them in messages.
    """

    lazy = True

    def __init__(self, X: Any, y: Any = None, *, what: str = "", xp: Any = None) -> None:
        if xp is None:
            check_data(X, y, what)
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
        """An empty array of the chunks' library: parameters live there, in memory."""
        return chunk_like(self.X)

    def check_library(self, param: Any) -> None:
        """TypeError unless ``param`` is of the chunks' library and on their device."""
        ns.check_same_library(chunk_like(self.X), param, f"X{self.what}'s chunks")

    def in_dtype(self, model: Any, dtype: Any) -> DaskData:
        """The same data with ``X`` in ``dtype`` and ``y`` as ``model`` computes on it (lazy)."""
        X = self.X if self.X.dtype == dtype else self.xp.astype(self.X, dtype)
        y = None if self.y is None else model.prepare_targets(self.xp, self.y, dtype)
        return DaskData(X, y, what=self.what, xp=self.xp)

    def batches(self, batch_size: int | None, shuffle: bool,
                rng: np.random.Generator) -> Any:
        """The whole data, or :func:`batches` (chunk by chunk when shuffled)."""
        if batch_size is None or batch_size >= self.n_samples:
            yield self.X, self.y
            return
        yield from batches(self.X, self.y, batch_size, shuffle, rng)

    def loss_and_grad(self, model: Any, params: dict[str, Any], X: Any, y: Any, *,
                      key: int | None, need_grad: bool = True,
                      count_correct: bool = False) -> tuple[Any, ...]:
        """:func:`loss_and_grad` of a batch of this data."""
        return loss_and_grad(model, params, X, y, key=key, need_grad=need_grad,
                             count_correct=count_correct)

    def loss(self, model: Any, params: dict[str, Any]) -> float:
        return float(loss_and_grad(model, params, self.X, self.y, key=None,
                                   need_grad=False)[0])

    def outputs(self, model: Any, params: dict[str, Any]) -> Any:
        """The model's outputs as a lazy Dask array, computed with copies of today's
        parameters (training may change the arrays in place before it is computed)."""
        return model.forward(self.xp, snapshot(params), self.X)

    def score(self, model: Any, params: dict[str, Any]) -> float:
        return score(model, params, self.X, self.y)

    def evaluate(self, model: Any, params: dict[str, Any]) -> tuple[float, float]:
        """``(loss, metric)``: two passes over the chunks (loss, then metric)."""
        return self.loss(model, params), self.score(model, params)

    def spread(self) -> float:
        """Sum of squared deviations of the targets from their mean (reads ``y`` once)."""
        if self._spread is None:
            xp, y = self.xp, self.y
            self._spread = float(xp.sum((y - xp.mean(y, axis=0)) ** 2))
        return self._spread


def _import_dask() -> Any:
    require_dask()
    import dask

    return dask


def loss_and_grad(model: Any, params: dict[str, Any], X: Any, y: Any, *, key: int | None,
                  need_grad: bool = True, count_correct: bool = False) -> tuple[Any, ...]:
    r"""The model's mean loss (and gradients) on Dask ``X``, ``y``, reduced over the chunks.

    Each chunk is one task, which runs the model's own loss and gradient (its
    array API code, on the chunk's library) where the chunk is, and returns them
    weighted by its share of the rows, :math:`n_c / n`; a tree of additions sums
    them. The losses are means over the samples, so the weighted sum is the mean
    over all of them. One ``dask.compute`` per call; the parameters enter the
    graph once, as one small constant.

    Dropout masks (``key`` not None) are drawn per chunk, from ``key`` and the chunk's
    position, so a model with dropout trains on other masks than the same batch held
    in NumPy.

    With ``count_correct`` (classifiers), each task also counts the chunk's correct
    labels from the same forward pass (as :func:`~optim_core.fit` does on the
    batches it trains on), so the training metric costs no pass of its own.

    Returns
    -------
    (loss, grads, correct)
        New arrays in the parameters' library, device and dtype (a 0-d loss); grads
        is None without ``need_grad``; ``correct`` is a Python float, or None
        without ``count_correct``.
    """
    def work(i: int) -> tuple[Any, ...]:
        chunk_key = None if key is None else dropout_key(key, _CHUNK_STREAM, i)
        return (chunk_key, need_grad, count_correct)

    loss, grads, correct = _map_reduce(model, params, X, y, _chunk_loss_grad, _add_losses, work)
    like = next(iter(params.values()))
    xp = ns.namespace_of(like)
    device = ns.device_of(like)

    def own(value: Any) -> Any:
        return xp.asarray(value, dtype=like.dtype, device=device, copy=True)

    grads = None if grads is None else {name: own(value) for name, value in grads.items()}
    return own(loss), grads, correct


def score(model: Any, params: dict[str, Any], X: Any, y: Any) -> float:
    r"""The model's :meth:`~optim_core.models.Model.score` on Dask ``X``, ``y``.

    Accuracy from each chunk's count of correct labels; :math:`R^2` from each
    chunk's residual sum of squares, target mean and sum of squared deviations,
    merged pairwise (Chan, Golub & LeVeque, 1979), so no chunk is read twice.
    """
    if model.task == "classification":
        n, correct = _map_reduce(model, params, X, y, _chunk_correct, _add_counts)
        return float(correct) / n
    _, residual, _, deviations = _map_reduce(model, params, X, y, _chunk_squares,
                                             _merge_squares)
    return r2(float(residual), float(np.sum(deviations)))


def _map_reduce(model: Any, params: dict[str, Any], X: Any, y: Any, work: Any, combine: Any,
                arguments: Any = lambda i: ()) -> Any:
    """``combine`` over a tree of ``work(model, params, X_c, y_c, n_c / n, *arguments(i))``."""
    dask = _import_dask()
    rows = X.chunks[0]
    X = X.rechunk({1: -1}) if X.numblocks[1] > 1 else X
    y = y.rechunk((rows,) + tuple(-1 for _ in y.shape[1:]))
    # Model and parameters enter the graph once each, not once per chunk's task.
    spec = copy.copy(model)
    spec.params = None
    spec = dask.delayed(spec, pure=True, traverse=False)
    params = dask.delayed(dict(params), pure=True, traverse=False)
    task = dask.delayed(work, pure=True)
    n_samples = X.shape[0]
    parts = [task(spec, params, X_c, y_c, n_c / n_samples, *arguments(i))
             for i, (X_c, y_c, n_c) in enumerate(zip(X.to_delayed().ravel(),
                                                       y.to_delayed().ravel(), rows))]
    merge = dask.delayed(combine, pure=True)
    while len(parts) > 1:
        parts = [merge(*parts[i:i + _FAN_IN]) for i in range(0, len(parts), _FAN_IN)]
    (result,) = dask.compute(parts[0])
    return result


# Tasks run on the workers, on one chunk each (any array library), and their merges.
def _chunk_loss_grad(model: Any, params: dict[str, Any], X: Any, y: Any, weight: float,
                     key: int | None, need_grad: bool,
                     count_correct: bool) -> tuple[Any, Any, float | None]:
    xp = ns.namespace_of(X)
    loss, grads, outputs = model.loss_terms(xp, params, X, y, key=key, need_grad=need_grad)
    correct = float(model.count_correct(xp, outputs, y)) if count_correct else None
    return loss * weight, (None if grads is None else
                           {name: grad * weight for name, grad in grads.items()}), correct


def _add_losses(*parts: tuple[Any, Any, float | None]) -> tuple[Any, Any, float | None]:
    loss, grads, correct = parts[0]
    grads = None if grads is None else dict(grads)
    for other_loss, other_grads, other_correct in parts[1:]:
        loss = loss + other_loss
        for name, grad in (other_grads or {}).items():
            grads[name] = grads[name] + grad
        correct = None if correct is None else correct + other_correct
    return loss, grads, correct


def _chunk_predictions(model: Any, params: dict[str, Any], X: Any) -> tuple[Any, Any]:
    xp = ns.namespace_of(X)
    return xp, model.predictions(xp, model.forward(xp, params, X))


def _chunk_correct(model: Any, params: dict[str, Any], X: Any, y: Any,
                   weight: float) -> tuple[int, int]:
    xp, predictions = _chunk_predictions(model, params, X)
    return int(X.shape[0]), int(xp.sum(xp.astype(predictions == y, xp.int64)))


def _add_counts(*parts: tuple[int, int]) -> tuple[int, int]:
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _chunk_squares(model: Any, params: dict[str, Any], X: Any, y: Any,
                   weight: float) -> tuple[int, float, np.ndarray, np.ndarray]:
    """Rows, residual sum of squares, per-output target mean and squared deviations."""
    xp, predictions = _chunk_predictions(model, params, X)
    mean = xp.mean(y, axis=0)
    return (int(X.shape[0]), float(xp.sum((y - predictions) ** 2)),
            ns.to_numpy(mean), ns.to_numpy(xp.sum((y - mean) ** 2, axis=0)))


def _merge_squares(*parts: tuple[int, float, np.ndarray, np.ndarray]) -> tuple[Any, ...]:
    n, residual, mean, deviations = parts[0]
    for n_b, residual_b, mean_b, deviations_b in parts[1:]:
        total = n + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        deviations = deviations + deviations_b + delta * delta * (n * n_b / total)
        n, residual = total, residual + residual_b
    return n, residual, mean, deviations


def snapshot(params: dict[str, Any]) -> dict[str, Any]:
    """Copies of the parameters, for a graph computed later (after steps change them)."""
    return {name: ns.namespace_of(value).asarray(value, copy=True)
            for name, value in params.items()}


def epoch_order(rng: np.random.Generator, chunks: tuple[int, ...]) -> np.ndarray:
    """The order of the rows in one epoch of shuffled mini-batches on chunked data.

    The chunks in a random order, and within each chunk its rows in a random
    order: a permutation of ``range(sum(chunks))`` in which each chunk's rows are
    consecutive.

    Parameters
    ----------
    rng : numpy.random.Generator
        Draws the chunk order first, then each chunk's row order (in visiting order).
    chunks : tuple of int
        Rows per chunk (``X.chunks[0]``).
    """
    starts = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int64)
    parts = [starts[i] + rng.permutation(chunks[i]) for i in rng.permutation(len(chunks))]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)


def batches(X: Any, y: Any, batch_size: int, shuffle: bool,
            rng: np.random.Generator) -> Any:
    """Mini-batches of Dask ``X`` and ``y`` (lazy; nothing is computed here).

    Without ``shuffle``: contiguous slices, as for any other array library. With
    it: consecutive runs of :func:`epoch_order`. A batch is built from its source
    chunks, one piece per chunk: the whole chunk where the batch holds all of its
    rows, else the chunk's rows it holds (sorted: the order of the rows inside a
    batch does not change its mean gradient). Each piece is a task on one chunk,
    so computing a batch moves no rows between workers.
    """
    n_samples = X.shape[0]
    if not shuffle:
        for start in range(0, n_samples, batch_size):
            stop = min(start + batch_size, n_samples)
            yield X[start:stop], y[start:stop]
        return
    da = require_dask()
    rows = X.chunks[0]
    y = y.rechunk((rows,) + tuple(-1 for _ in y.shape[1:]))
    starts = np.concatenate([[0], np.cumsum(rows)]).astype(np.int64)
    order = epoch_order(rng, rows)
    for start in range(0, n_samples, batch_size):
        index = order[start:start + batch_size]
        chunk_of = np.searchsorted(starts, index, side="right") - 1
        X_pieces, y_pieces = [], []
        for chunk in np.unique(chunk_of):
            X_chunk, y_chunk = X.blocks[int(chunk)], y.blocks[int(chunk)]
            local = np.sort(index[chunk_of == chunk] - starts[chunk])
            if local.size < rows[chunk]:
                X_chunk, y_chunk = X_chunk[local], y_chunk[local]
            X_pieces.append(X_chunk)
            y_pieces.append(y_chunk)
        yield da.concatenate(X_pieces, axis=0), da.concatenate(y_pieces, axis=0)


class _NpyRows:
    """Rows of a ``.npy`` file, read on demand (what ``dask.array.from_array`` slices).

    Pickles as its path alone, so a task sent to a worker carries no data; each
    chunk is read by the worker that needs it, from a memory map of the file
    (which must be at the same path on every worker: a shared file system).
    """

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.fspath(path))
        header = np.load(self.path, mmap_mode="r")
        self.shape = tuple(header.shape)
        self.dtype = header.dtype
        self.ndim = header.ndim
        stat = os.stat(self.path)
        self._token = (self.path, stat.st_size, stat.st_mtime_ns, self.shape, str(self.dtype))
        del header

    def __getitem__(self, key: Any) -> np.ndarray:
        return np.array(np.load(self.path, mmap_mode="r")[key])

    def __dask_tokenize__(self) -> Any:
        return ("optim_core.train.dask_data._NpyRows",) + self._token

    def __reduce__(self) -> Any:
        return (_NpyRows, (self.path,))


def read_npy(path: str | os.PathLike, *, chunk_rows: int) -> Any:
    """A lazy Dask array over a ``.npy`` file, ``chunk_rows`` rows per chunk.

    Nothing is read until a chunk is computed; each task reads its rows from the
    file (memory-mapped), so a file larger than memory trains out-of-core. On a
    multi-node cluster the file must be at the same path on every worker.
    Zarr stores are read the same way with ``dask.array.from_zarr``.
    """
    da = require_dask()
    chunk_rows = checks.integer("chunk_rows", chunk_rows, minimum=1)
    rows = _NpyRows(path)
    chunks = (int(chunk_rows),) + rows.shape[1:]
    return da.from_array(rows, chunks=chunks, lock=False, asarray=False, fancy=False,
                         meta=np.empty((0,) * rows.ndim, dtype=rows.dtype))


def synthetic(n_samples: int, n_features: int, *, chunk_rows: int,
              task: str = "regression", n_classes: int = 2, noise: float = 0.1,
              seed: int = 0, dtype: Any = np.float64) -> tuple[Any, Any, np.ndarray]:
    r"""A lazily generated data set of any size: nothing is held until computed.

    Features are uniform with zero mean and unit variance; a linear teacher
    :math:`W` (drawn from ``seed``, returned) gives the targets:
    :math:`y = XW + \sigma\varepsilon` for regression,
    :math:`y = \arg\max_k (XW + \sigma\varepsilon)_k` for classification (``W`` of
    shape ``(n_features, n_classes)``). Each chunk is a pure function of ``seed``
    and its position, so every computation of the array sees the same numbers,
    and a chunk of ``y`` is computed from the same chunk of ``X``.

    Returns
    -------
    (X, y, W)
        Dask arrays chunked by ``chunk_rows`` rows, and the teacher as NumPy.
    """
    da = require_dask()
    checks.choice("task", task, ("regression", "classification"))
    n_samples = checks.integer("n_samples", n_samples, minimum=1)
    n_features = checks.integer("n_features", n_features, minimum=1)
    chunk_rows = checks.integer("chunk_rows", chunk_rows, minimum=1)
    teacher_rng = np.random.default_rng([seed, 0])
    outputs = 1 if task == "regression" else n_classes
    W = teacher_rng.normal(size=(n_features, outputs)) / np.sqrt(n_features)
    rng = da.random.default_rng(seed)
    # Uniform on [-sqrt(3), sqrt(3)]: zero mean, unit variance, three times as fast to draw.
    X = (rng.random((n_samples, n_features), chunks=(chunk_rows, n_features)) - 0.5) \
        * np.sqrt(12.0)
    scores = X @ W + noise * rng.standard_normal((n_samples, outputs),
                                                 chunks=(chunk_rows, outputs))
    X = X.astype(dtype)
    if task == "regression":
        return X, scores[:, 0].astype(dtype), W[:, 0]
    return X, da.argmax(scores, axis=1), W
