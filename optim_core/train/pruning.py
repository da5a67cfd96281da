r"""Magnitude pruning as a callback of :func:`~optim_core.fit`, and sparse storage.

The founding article's FAQ 6.13 and 6.14 (computation and storage costs) answer "use
pruning": remove the weights that matter least, here the smallest in magnitude.

* :func:`magnitude_masks`: keep-masks zeroing the ``round(s n)`` weights of smallest
  :math:`|w|`, ranked per layer or over all layers together (global).
* :func:`polynomial_sparsity`: the gradual schedule of Zhu & Gupta ("To prune, or not
  to prune", 2017),

  .. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_1 - t_0}\right)^3,
     \qquad t_0 \le t \le t_1,

  raising the sparsity fast at first and slowly at the end.
* :class:`MagnitudePruning`: the callback. ``fit`` asks it for the masks every step
  (:meth:`MagnitudePruning.step_masks`): the gradients are masked before penalties,
  clipping and the optimizer see them, and after the optimizer's step the weights
  and every optimizer state buffer are masked again
  (:class:`~optim_core.train.pipeline.MaskGradients`,
  :class:`~optim_core.train.pipeline.ApplyMasks`), so a pruned weight is exactly zero
  after every step through any optimizer, momentum and weight decay included. The
  masks are part of the callback's state, so a checkpointed run resumes with them.
* :func:`save_sparse`, :func:`load_sparse`, :func:`storage_bytes`: the pruned model
  stored as a bit mask of its nonzeros plus their values, compressed.

Pruning works on any array library the model's parameters are in; the masks live
next to the parameters, in their dtype.
"""

from __future__ import annotations

import io
import json
import math
import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .. import _checks as checks
from .. import _namespace as ns
from .callbacks import Callback

__all__ = ["MagnitudePruning", "magnitude_masks", "polynomial_sparsity", "sparsity",
           "layer_sparsity", "save_sparse", "load_sparse", "storage_bytes", "SCOPES",
           "SPARSE_MAGIC"]

#: How weights are ranked: within each layer, or all the pruned layers together.
SCOPES = ("layer", "global")


def polynomial_sparsity(step: int, *, final: float, begin_step: int, end_step: int,
                        initial: float = 0.0, power: float = 3.0) -> float:
    r"""The target sparsity at ``step`` of Zhu & Gupta's gradual schedule.

    .. math:: s_t = s_f + (s_i - s_f)\left(1 - \frac{t - t_0}{t_1 - t_0}\right)^p

    for :math:`t_0 \le t \le t_1`; 0 before :math:`t_0` (nothing pruned yet) and
    :math:`s_f` after :math:`t_1`.

    Parameters
    ----------
    step : int
        :math:`t`.
    final, initial : float in [0, 1)
        :math:`s_f` and :math:`s_i`.
    begin_step, end_step : int
        :math:`t_0 \le t_1` (equal: one-shot pruning to ``final`` at :math:`t_0`).
    power : float
        :math:`p`; the paper's 3.
    """
    if step < begin_step:
        return 0.0
    if step >= end_step:
        return final
    progress = (step - begin_step) / (end_step - begin_step)
    return final + (initial - final) * (1.0 - progress) ** power


def _flat(xp: Any, array: Any) -> Any:
    return xp.reshape(array, (-1,))


def magnitude_masks(weights: Mapping[str, Any], sparsity: float, *, scope: str = "global",
                    previous: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Boolean keep-masks pruning the ``sparsity`` share of ``weights`` smallest in magnitude.

    Parameters
    ----------
    weights : dict of name -> array
        Of one array library and device.
    sparsity : float in [0, 1)
        Share of the entries to prune: exactly ``round(sparsity * n)`` of the ``n``
        entries of each weight (``scope="layer"``) or of all together (``"global"``).
    scope : {"global", "layer"}
        Global ranking gives more of the budget to the layers whose weights are larger.
    previous : dict of name -> boolean array, optional
        Masks already applied: their pruned entries rank first (smallest), so masks of
        a rising sparsity only ever grow; ties are broken by position (a stable sort).

    Returns
    -------
    dict of name -> boolean array
        True where the weight is kept; on the weights' device.
    """
    checks.number("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
    checks.choice("scope", scope, SCOPES)
    if not weights:
        return {}
    names = list(weights)
    xp = ns.common_namespace([weights[n] for n in names], names)

    def scores(name: str) -> Any:
        magnitude = xp.abs(_flat(xp, weights[name]))
        if previous is not None and name in previous:
            magnitude = xp.where(_flat(xp, previous[name]), magnitude, -1.0)
        return magnitude

    def keep(values: Any) -> Any:
        count = int(values.shape[0])
        pruned = int(round(sparsity * count))
        # The rank of each entry in ascending order: argsort of a (stable) argsort.
        ranks = xp.argsort(xp.argsort(values, stable=True), stable=True)
        return ranks >= pruned

    if scope == "layer":
        return {name: xp.reshape(keep(scores(name)), tuple(weights[name].shape))
                for name in names}
    together = keep(xp.concat([scores(name) for name in names]))
    masks, start = {}, 0
    for name in names:
        size = math.prod(weights[name].shape)
        masks[name] = xp.reshape(together[start:start + size], tuple(weights[name].shape))
        start += size
    return masks


def layer_sparsity(params: Mapping[str, Any],
                   names: Iterable[str] | None = None) -> dict[str, float]:
    """The share of exact zeros in each parameter ``names`` (default: the weights ``W*``)."""
    chosen = [n for n in params if n.startswith("W")] if names is None else list(names)
    out = {}
    for name in chosen:
        array = params[name]
        xp = ns.namespace_of(array)
        out[name] = float(xp.sum(xp.astype(array == 0, xp.float64))) / max(
            math.prod(array.shape), 1)
    return out


def sparsity(params: Mapping[str, Any], names: Iterable[str] | None = None) -> float:
    """The share of exact zeros over the parameters ``names`` together (default: ``W*``)."""
    chosen = [n for n in params if n.startswith("W")] if names is None else list(names)
    sizes = [math.prod(params[n].shape) for n in chosen]
    shares = layer_sparsity(params, chosen)
    total = sum(sizes)
    return sum(shares[n] * size for n, size in zip(chosen, sizes)) / total if total else 0.0


class MagnitudePruning(Callback):
    r"""Prune the weights smallest in magnitude while :func:`~optim_core.fit` trains.

    One-shot (``end_step=None``): at optimizer step ``begin_step`` (0: the first step
    of the run) the weights are pruned to ``sparsity`` and the masks stay fixed while
    training goes on: prune a trained model, then fine-tune it. Gradual (an
    ``end_step``): every ``frequency`` steps from ``begin_step`` to ``end_step`` the
    masks are recomputed from the current magnitudes at the sparsity of
    :func:`polynomial_sparsity` (Zhu & Gupta, 2017), pruned weights ranking first so
    that the masks only grow; from ``end_step`` on it is ``sparsity``.

    Every step (see :mod:`optim_core.train.pipeline`): :math:`g \leftarrow g\odot M`
    first, and after the optimizer's update :math:`W \leftarrow W\odot M` and
    :math:`s \leftarrow s\odot M` for each of the optimizer's state buffers, so a pruned
    weight is exactly zero (possibly ``-0.0``) after every step, whatever the optimizer,
    its momentum or weight decay.

    The masks change inside a step, after its gradient was computed: that one step's
    gradient (masked) is the unpruned network's.

    Steps count as ``fit``'s schedules count them: the optimizer's steps taken (a new
    optimizer starts at 0; a resumed run continues its count). The masks, the sparsity
    reached and the step of the last pruning are the callback's state
    (:meth:`state_dict`), saved in ``fit``'s checkpoints, so a resumed run keeps them.

    Parameters
    ----------
    sparsity : float in [0, 1)
        The share of the pruned weights' entries that ends up zero.
    scope : {"global", "layer"}
        Rank the magnitudes over all the pruned parameters together, or per parameter.
    begin_step : int >= 0
        The step of the (first) pruning.
    end_step : int, optional
        With it, gradual pruning reaching ``sparsity`` at this step (> ``begin_step``).
    frequency : int >= 1
        Steps between two prunings of the gradual schedule (the paper's
        :math:`\Delta t`; 100 to 1000 in it).
    initial_sparsity : float in [0, sparsity]
        :math:`s_i`, the gradual schedule's sparsity at ``begin_step``.
    power : float > 0
        The schedule's exponent (3 in the paper).
    params : iterable of str, optional
        The parameters to prune; default the model's weights
        (:attr:`~optim_core.models.Model.regularized`), never the biases.

    Attributes
    ----------
    masks : dict of name -> boolean array, or None
        The current keep-masks (True: kept), on the parameters' device; None before
        the first pruning.
    current_sparsity : float
        The sparsity of the last pruning (0 before it).
    last_pruned_step : int or None
        The optimizer step of the last pruning.

    Notes
    -----
    Place it after :class:`~optim_core.EarlyStopping` in ``callbacks``: at the end of
    training it masks the model's parameters once more, so restored best weights
    (of an epoch with fewer weights pruned) come back pruned to the final masks.
    """

    def __init__(self, sparsity: float = 0.9, *, scope: str = "global", begin_step: int = 0,
                 end_step: int | None = None, frequency: int = 100,
                 initial_sparsity: float = 0.0, power: float = 3.0,
                 params: Iterable[str] | None = None) -> None:
        self.sparsity = checks.number("sparsity", sparsity, low=0.0, high=1.0, high_open=True)
        self.scope = checks.choice("scope", scope, SCOPES)
        self.begin_step = checks.integer("begin_step", begin_step, minimum=0)
        if end_step is not None:
            end_step = checks.integer("end_step", end_step, minimum=self.begin_step + 1)
        self.end_step = end_step
        self.frequency = checks.integer("frequency", frequency, minimum=1)
        self.initial_sparsity = checks.number("initial_sparsity", initial_sparsity, low=0.0,
                                              high=self.sparsity)
        self.power = checks.number("power", power, low=0.0, low_open=True)
        if params is not None:
            if isinstance(params, (str, bytes)):
                raise checks.WrongTypeError("params must be an iterable of parameter names")
            params = tuple(params)
            if not params or not all(isinstance(n, str) for n in params):
                raise ValueError(f"params must name at least one parameter, got {params!r}")
        self.params = params
        self.masks: dict[str, Any] | None = None
        self.current_sparsity = 0.0
        self.last_pruned_step: int | None = None
        self._keep: dict[str, Any] = {}  # the masks in the parameters' dtype (0 and 1)
        self._host_masks: dict[str, np.ndarray] | None = None  # loaded, not yet on the device
        self._model_names: list[str] | None = None

    # ------------------------------------------------------------------ schedule
    def target(self, step: int) -> float:
        """The sparsity the schedule asks for at optimizer step ``step``."""
        if self.end_step is None:
            return self.sparsity if step >= self.begin_step else 0.0
        return polynomial_sparsity(step, final=self.sparsity, initial=self.initial_sparsity,
                                   begin_step=self.begin_step, end_step=self.end_step,
                                   power=self.power)

    def _due(self, step: int) -> bool:
        if step < self.begin_step or step == self.last_pruned_step:
            return False
        if self.target(step) == self.current_sparsity and self.masks is not None:
            return False
        if self.end_step is None or step >= self.end_step:
            return True
        return (step - self.begin_step) % self.frequency == 0

    def _names(self, model_params: Mapping[str, Any], regularized: Iterable[str]) -> list[str]:
        names = list(self.params) if self.params is not None else list(regularized)
        unknown = [n for n in names if n not in model_params]
        if unknown:
            raise ValueError(f"MagnitudePruning: the model has no parameters {unknown}; it has "
                             f"{list(model_params)}")
        return names

    # ------------------------------------------------------------------ fit's hooks
    def on_train_begin(self, model: Any, history: Any) -> None:
        names = self._names(model.params, model.regularized)
        if self.masks is not None:
            stale = [n for n in names if n not in self.masks
                     or tuple(self.masks[n].shape) != tuple(model.params[n].shape)]
            if stale:
                raise ValueError(f"MagnitudePruning holds masks of another model (for "
                                 f"{stale}); use a new callback for a new model")
        self._model_names = names

    def step_masks(self, params: Any) -> dict[str, Any]:
        """The keep-masks of this step, in the parameters' dtype (name -> 0/1 array).

        Called by ``fit`` before every step with its
        :class:`~optim_core.train.pipeline.TrainedParams`. On a pruning step the masks
        are recomputed from the current weights and the weights are masked at once.
        """
        arrays = params.arrays
        if self._host_masks is not None:
            self._adopt(arrays, {name: params.xp.asarray(
                mask, device=ns.device_of(arrays[name]), copy=True)
                for name, mask in self._host_masks.items()})
            self._host_masks = None
        step = int(params.optimizer.group_state[0]["step"])
        if self._due(step):
            names = self._model_names or list(self.params or arrays)
            target = self.target(step)
            masks = magnitude_masks({n: arrays[n] for n in names}, target, scope=self.scope,
                                    previous=self.masks)
            self._adopt(arrays, masks)
            self.current_sparsity, self.last_pruned_step = target, step
            for group, group_names in enumerate(params.group_names):
                chosen = [n for n in group_names if n in self._keep]
                if chosen:
                    params.write(group, chosen, [arrays[n] * self._keep[n] for n in chosen])
        return self._keep

    def _adopt(self, arrays: Mapping[str, Any], masks: Mapping[str, Any]) -> None:
        xp = ns.namespace_of(next(iter(arrays.values())))
        self.masks = dict(masks)
        self._keep = {name: xp.astype(mask, arrays[name].dtype) for name, mask in masks.items()}

    def on_train_end(self, model: Any, history: Any) -> None:
        if not self._keep or model.params is None:
            return
        params = dict(model.params)
        for name, keep in self._keep.items():
            target = params[name]
            if ns.is_writeable(target):
                target *= keep
            else:
                params[name] = target * keep
        model.params = params

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The masks (host boolean arrays), the sparsity reached and the last pruning step."""
        masks = self._host_masks if self._host_masks is not None else (
            None if self.masks is None else
            {name: ns.to_numpy(mask).astype(bool) for name, mask in self.masks.items()})
        return {"masks": None if masks is None else dict(masks),
                "current_sparsity": self.current_sparsity,
                "last_pruned_step": self.last_pruned_step}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`'s output; the masks go to the device at the next step."""
        if not isinstance(state, Mapping):
            raise TypeError(f"MagnitudePruning state must be a dict, got {type(state).__name__}")
        missing = {"masks", "current_sparsity", "last_pruned_step"} - set(state)
        if missing:
            raise ValueError(f"MagnitudePruning state lacks {sorted(missing)}")
        current = checks.number("current_sparsity", state["current_sparsity"], low=0.0,
                                high=1.0, high_open=True)
        last = state["last_pruned_step"]
        if last is not None:
            last = checks.integer("last_pruned_step", last, minimum=0)
        masks = state["masks"]
        if masks is not None:
            if not isinstance(masks, Mapping) or not all(
                    isinstance(n, str) and isinstance(m, np.ndarray) and m.dtype == bool
                    for n, m in masks.items()):
                raise TypeError("MagnitudePruning masks must be a dict of boolean NumPy arrays")
            masks = {name: np.array(mask, copy=True) for name, mask in masks.items()}
        self.current_sparsity, self.last_pruned_step = current, last
        self._host_masks = masks
        if masks is None:
            self.masks, self._keep = None, {}

    def __repr__(self) -> str:
        kind = "one-shot" if self.end_step is None else \
            f"gradual to step {self.end_step} every {self.frequency}"
        return (f"MagnitudePruning(sparsity={self.sparsity}, scope={self.scope!r}, "
                f"begin_step={self.begin_step}, {kind})")


# ---------------------------------------------------------------------------- storage
#: The first bytes of a :func:`save_sparse` file.
SPARSE_MAGIC = b"optim-core-sparse\n"
_SPARSE_VERSION = 1
_MAX_HEADER = 1 << 20  # bytes of JSON header a file may declare


def _host_params(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {}
    for name, value in params.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"parameter names must be non-empty strings, got {name!r}")
        array = np.ascontiguousarray(ns.to_numpy(value))
        if array.dtype.kind != "f":
            raise TypeError(f"parameter {name!r} has dtype {array.dtype}, not a floating dtype")
        out[name] = array
    return out


def _encode_sparse(params: Mapping[str, Any]) -> bytes:
    entries, payload = [], []
    for name, array in _host_params(params).items():
        flat = array.reshape(-1)
        nonzero = flat != 0
        values = flat[nonzero]
        entries.append({"name": name, "shape": list(array.shape), "dtype": array.dtype.str,
                        "nonzeros": int(values.size)})
        payload += [np.packbits(nonzero).tobytes(), values.tobytes()]
    header = json.dumps({"format": "optim-core-sparse", "version": _SPARSE_VERSION,
                         "params": entries}, separators=(",", ":")).encode()
    return (SPARSE_MAGIC + len(header).to_bytes(4, "little") + header
            + zlib.compress(b"".join(payload), 9))


def save_sparse(path: str | os.PathLike[str], params: Mapping[str, Any]) -> Path:
    """Store ``params`` as a bit mask of their nonzeros and the nonzeros' values, compressed.

    The file: :data:`SPARSE_MAGIC`, a 4-byte little-endian length and a JSON header (each
    parameter's name, shape, dtype and count of nonzeros), then one zlib stream of, per
    parameter, ``np.packbits(array != 0)`` (one bit per entry, row-major) followed by the
    nonzero values in the parameter's dtype. A pruned weight costs one bit before
    compression; a kept one a bit plus its value. Read back with :func:`load_sparse`.
    """
    path = Path(path)
    path.write_bytes(_encode_sparse(params))
    return path


def load_sparse(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The dense NumPy parameters :func:`save_sparse` stored (pruned entries ``+0.0``).

    Nothing is executed or unpickled; the header is JSON, and the memory used is bounded
    by the sizes the header declares (the stream is decompressed up to them, no further).

    Raises
    ------
    ValueError
        For a file that is not such a file, or whose parts disagree (a count of
        nonzeros other than the mask's, a stream shorter or longer than declared).
    """
    with Path(path).open("rb") as handle:
        if handle.read(len(SPARSE_MAGIC)) != SPARSE_MAGIC:
            raise ValueError(f"{path} is not an optim-core sparse file")
        length = int.from_bytes(handle.read(4), "little")
        if length > _MAX_HEADER:
            raise ValueError(f"{path}: its header claims {length} bytes")
        try:
            header = json.loads(handle.read(length))
        except ValueError as exc:
            raise ValueError(f"{path}: unreadable header ({exc})") from None
        if not isinstance(header, dict) or header.get("version") != _SPARSE_VERSION or \
                not isinstance(header.get("params"), list):
            raise ValueError(f"{path}: unsupported sparse file header")
        layout = []
        for entry in header["params"]:
            try:
                name, shape, nonzeros = entry["name"], entry["shape"], entry["nonzeros"]
                dtype = np.dtype(entry["dtype"])
                ok = isinstance(name, str) and isinstance(shape, list) and all(
                    isinstance(s, int) and s >= 0 for s in shape) and dtype.kind == "f" \
                    and isinstance(nonzeros, int) and 0 <= nonzeros <= math.prod(shape)
            except (KeyError, TypeError, ValueError):
                ok = False
            if not ok:
                raise ValueError(f"{path}: bad parameter entry {entry!r:.200}")
            size = math.prod(shape)
            layout.append((name, tuple(shape), dtype, nonzeros, (size + 7) // 8,
                           nonzeros * dtype.itemsize))
        expected = sum(mask + values for *_, mask, values in layout)
        stream = zlib.decompressobj()
        payload = stream.decompress(handle.read(), expected + 1)
        if len(payload) != expected or stream.unconsumed_tail or stream.unused_data or \
                not stream.eof:
            raise ValueError(f"{path}: the data does not match its header")
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape, dtype, nonzeros, mask_bytes, value_bytes in layout:
        size = math.prod(shape)
        keep = np.unpackbits(np.frombuffer(payload, np.uint8, mask_bytes, offset),
                             count=size).astype(bool)
        offset += mask_bytes
        if int(keep.sum()) != nonzeros:
            raise ValueError(f"{path}: the mask of {name!r} does not hold {nonzeros} nonzeros")
        dense = np.zeros(size, dtype=dtype)
        dense[keep] = np.frombuffer(payload, dtype, nonzeros, offset)
        offset += value_bytes
        out[name] = dense.reshape(shape)
    return out


def storage_bytes(params: Mapping[str, Any]) -> dict[str, int]:
    """Bytes to store ``params``: raw, dense compressed, and sparse compressed.

    Returns
    -------
    dict
        ``raw`` (the arrays' bytes), ``dense_compressed`` (``np.savez_compressed`` of the
        dense arrays, with pruned ``-0.0`` stored as ``+0.0``) and ``sparse_compressed``
        (the size of :func:`save_sparse`'s file).
    """
    host = {name: np.where(array == 0, np.zeros((), array.dtype), array)
            for name, array in _host_params(params).items()}
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **host)
    return {"raw": int(sum(a.nbytes for a in host.values())),
            "dense_compressed": len(buffer.getvalue()),
            "sparse_compressed": len(_encode_sparse(host))}
