r"""Post-training quantization of the bundled models to low-bit integer weights.

The founding article's FAQ 6.13 and 6.14 answer "use quantization" for a model's
computation and storage costs. :func:`quantize` turns a trained model into a
:class:`QuantizedModel` whose ``predict`` computes with integer weights:

* **weights**: symmetric, per output channel (Krishnamoorthi, "Quantizing deep
  convolutional networks for efficient inference", 2018; Jacob et al., CVPR 2018):
  for output channel :math:`j` of a layer, :math:`s_j = \max_i |W_{ij}| / q_{max}` and
  :math:`Q_{ij} = \mathrm{clip}(\mathrm{round}(W_{ij}/s_j), -q_{max}, q_{max})` with
  :math:`q_{max} = 2^{b-1} - 1` (127 for int8); stored as int8, dequantized as
  :math:`W \approx Q s`. Biases stay in floating point (they are a sliver of the size).
* **activations** (optional, static): each layer's input scaled by one scale
  calibrated on training data, :math:`a = \max |h| / q_{max}` over the calibration
  set, and rounded to integers too; the layer is then an integer matrix product
  accumulated in int32, rescaled once by :math:`a\,s_j`:
  :math:`z_j = a s_j \sum_i \mathrm{round}(h_i/a)\,Q_{ij} + b_j`.

Without activation quantization the product is :math:`z = (h Q) s + b`: the int8 weights
cast to the activations' dtype inside the matmul, the scales applied to its output.

:class:`QuantizationAware` is the optional quantization-aware fine-tuning: the model's
forward and backward passes use fake-quantized weights :math:`Q s`, and the
straight-through estimator (Bengio, Léonard & Courville, 2013) passes the gradient with
respect to :math:`Q s` on to the float weights unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from typing import Any

from .. import _checks as checks
from .. import _namespace as ns
from . import data as data_adapters
from .metrics import r2
from .models import Model

__all__ = ["quantize", "quantize_weight", "QuantizedModel", "QuantizationAware"]


def _qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _check_bits(name: str, bits: Any) -> int:
    bits = checks.integer(name, bits, minimum=2)
    if bits > 8:
        raise ValueError(f"{name} must be at most 8 (the values are stored as int8), got {bits}")
    return bits


def quantize_weight(weight: Any, bits: int = 8, *, per_channel: bool = True) -> tuple[Any, Any]:
    r"""Symmetric quantization of one weight: ``(Q, s)`` with :math:`W \approx Q s`.

    Parameters
    ----------
    weight : array
        ``(n_inputs, n_outputs)``, or ``(n_inputs,)`` for a single output.
    bits : int in [2, 8]
        :math:`Q` takes the integers :math:`-q_{max} .. q_{max}`, :math:`q_{max} = 2^{b-1}-1`.
    per_channel : bool
        One scale per output channel (column) :math:`s_j = \max_i |W_{ij}|/q_{max}`;
        False: one scale for the whole weight. An all-zero channel gets scale 1.

    Returns
    -------
    (int8 array, float array)
        ``Q`` of ``weight``'s shape, and the scales: shape ``(n_outputs,)`` per channel
        (``()`` for a 1-D weight), ``()`` per tensor; in ``weight``'s dtype.
    """
    bits = _check_bits("bits", bits)
    checks.boolean("per_channel", per_channel)
    xp = ns.namespace_of(weight)
    if weight.ndim not in (1, 2):
        raise ValueError(f"a weight must be 1-D or 2-D, got shape {tuple(weight.shape)}")
    qmax = _qmax(bits)
    magnitude = xp.abs(weight)
    peak = xp.max(magnitude, axis=0) if per_channel and weight.ndim == 2 else xp.max(magnitude)
    scale = xp.where(peak > 0, peak / qmax, xp.ones_like(peak))
    q = xp.clip(xp.round(weight / scale), -qmax, qmax)
    return xp.astype(q, xp.int8), scale


class QuantizedModel:
    r"""A trained model with integer weights; ``predict`` computes with them.

    Made by :func:`quantize`. Holds, per dense layer, the int8 weight, its scales and the
    float bias, and (with activation quantization) each layer's input scale; the model's
    structure (activations, output head) is the original model's.

    Attributes
    ----------
    model : Model
        The structure (its parameters are not kept: only the quantized ones are).
    bits : int
    per_channel : bool
    weights, scales : dict of name -> array
        The int8 weights and their float scales, by the weight's name (``W0`` ...).
    biases : dict of name -> array
    activation_scales : list of float, or None
        Input scale of each layer; None when activations stay in floating point.
    activation_bits : int or None
    """

    def __init__(self, model: Model, weights: dict[str, Any], scales: dict[str, Any],
                 biases: dict[str, Any], bits: int, per_channel: bool,
                 activation_scales: list[float] | None, activation_bits: int | None) -> None:
        self.model = model
        self.weights, self.scales, self.biases = weights, scales, biases
        self.bits, self.per_channel = bits, per_channel
        self.activation_scales, self.activation_bits = activation_scales, activation_bits
        first = next(iter(scales.values()))
        self._xp = ns.namespace_of(first)
        self._dtype = first.dtype
        self._like = first

    @property
    def task(self) -> str:
        return self.model.task

    # ------------------------------------------------------------------ compute
    def _dense(self, i: int, h: Any) -> Any:
        xp = self._xp
        weight_name, bias_name = self.model.dense_layers()[i]
        q, scale, bias = self.weights[weight_name], self.scales[weight_name], \
            self.biases[bias_name]
        if self.activation_scales is None:
            return (h @ xp.astype(q, h.dtype)) * scale + bias
        a = self.activation_scales[i]
        qmax = _qmax(self.activation_bits)
        h_int = xp.astype(xp.clip(xp.round(h / a), -qmax, qmax), xp.int32)
        accumulated = h_int @ xp.astype(q, xp.int32)  # exact: int32 accumulation
        return xp.astype(accumulated, h.dtype) * (scale * a) + bias

    def forward(self, X: Any) -> Any:
        """The raw outputs (predictions or logits) computed with the integer weights."""
        data = data_adapters.ArrayData(X)
        data.check_library(self._like)
        self.model.check_inputs(data.X)
        X = data.X if data.X.dtype == self._dtype else self._xp.astype(data.X, self._dtype)
        return self.model.forward_with(self._xp, X, self._dense)

    def predict(self, X: Any) -> Any:
        """Predictions: class labels for classifiers, values for regression."""
        return self.model.predictions(self._xp, self.forward(X))

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities (classifiers)."""
        return self.model.probabilities(self._xp, self.forward(X))

    def score(self, X: Any, y: Any) -> float:
        """Accuracy (classifiers) or :math:`R^2` (regression), as the float model's ``score``."""
        xp = self._xp
        predictions = self.predict(X)
        y = self.model.prepare_targets(xp, data_adapters.ArrayData(X, y).y, self._dtype)
        if self.task == "classification":
            return float(xp.mean(xp.astype(predictions == y, self._dtype)))
        residual = float(xp.sum((y - predictions) ** 2))
        return r2(residual, float(xp.sum((y - xp.mean(y, axis=0)) ** 2)))

    def dequantized(self) -> Model:
        r"""A float copy of the model with the dequantized weights :math:`Q s`."""
        xp = self._xp
        params = {}
        for weight_name, bias_name in self.model.dense_layers():
            params[weight_name] = xp.astype(self.weights[weight_name], self._dtype) * \
                self.scales[weight_name]
            params[bias_name] = xp.asarray(self.biases[bias_name], copy=True)
        model = copy.copy(self.model)
        model.params = params
        return model

    # ------------------------------------------------------------------ size
    def nbytes(self) -> dict[str, int]:
        """Storage in bytes.

        ``weights``: ``bits`` per entry, packed (as a file of packed integers holds them;
        in memory they are int8, ``weights_int8`` bytes); ``scales`` and ``biases`` in the
        float dtype; ``total`` their sum. ``float_weights`` and ``float_total``: the same
        model with float weights (float32: 4 bytes an entry).
        """
        itemsize = _itemsize(self._like)
        n_weights = sum(math.prod(w.shape) for w in self.weights.values())
        out = {"weights": math.ceil(n_weights * self.bits / 8),
               "scales": sum(max(1, math.prod(s.shape)) for s in self.scales.values()) *
               itemsize,
               "biases": sum(max(1, math.prod(b.shape)) for b in self.biases.values()) *
               itemsize}
        if self.activation_scales is not None:
            out["scales"] += len(self.activation_scales) * itemsize
        out["total"] = out["weights"] + out["scales"] + out["biases"]
        out["weights_int8"] = n_weights
        out["float_weights"] = n_weights * itemsize
        out["float_total"] = out["float_weights"] + out["biases"]
        return out

    def __repr__(self) -> str:
        acts = "float activations" if self.activation_scales is None else \
            f"int{self.activation_bits} activations"
        return (f"QuantizedModel({type(self.model).__name__}, int{self.bits} weights "
                f"{'per channel' if self.per_channel else 'per tensor'}, {acts})")


def _itemsize(array: Any) -> int:
    itemsize = getattr(array.dtype, "itemsize", None)
    return int(itemsize) if itemsize is not None else int(ns.to_numpy(array).dtype.itemsize)


def _calibrate(model: Model, X: Any, bits: int) -> list[float]:
    """Each dense layer's input scale ``max |h| / qmax`` over ``X``, from a float pass."""
    xp = ns.namespace_of(X)
    params, peaks = model.params, []

    def record(i: int, h: Any) -> Any:
        peaks.append(float(xp.max(xp.abs(h))))
        weight_name, bias_name = model.dense_layers()[i]
        return h @ params[weight_name] + params[bias_name]

    model.forward_with(xp, X, record)
    qmax = _qmax(bits)
    return [peak / qmax if peak > 0 else 1.0 for peak in peaks]


def quantize(model: Model, *, bits: int = 8, per_channel: bool = True,
             calibration_data: Any = None, activation_bits: int = 8) -> QuantizedModel:
    r"""Post-training quantization of a trained model's dense weights.

    Parameters
    ----------
    model : Model
        A trained bundled model (linear, logistic, softmax regression or MLP).
    bits : int in [2, 8]
        Bits of the weights (symmetric: :math:`2^b - 1` levels); 8 is int8.
    per_channel : bool
        One scale per output channel (True) or per layer.
    calibration_data : array, optional
        Training inputs to calibrate the activations on: with it every layer's input
        is quantized to ``activation_bits`` too, and the layers run as integer matrix
        products accumulated in int32. Without it activations stay in floating point.
    activation_bits : int in [2, 8]

    Returns
    -------
    QuantizedModel
        ``predict``, ``predict_proba``, ``score`` with the integer weights; ``nbytes()``.

    Examples
    --------
    >>> qmodel = quantize(model)                                  # doctest: +SKIP
    >>> qmodel.score(X_test, y_test), qmodel.nbytes()["weights"]   # doctest: +SKIP
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be an optim_core.models.Model, got {type(model).__name__}")
    if model.params is None:
        raise RuntimeError(f"{type(model).__name__} has no parameters yet: train it first")
    bits = _check_bits("bits", bits)
    per_channel = checks.boolean("per_channel", per_channel)
    activation_bits = _check_bits("activation_bits", activation_bits)
    activation_scales = None
    if calibration_data is not None:
        data = model.prepare(calibration_data)
        if data.lazy:
            raise TypeError("calibration_data must be an in-memory array, not a Dask array")
        activation_scales = _calibrate(model, data.X, activation_bits)
    weights, scales, biases = {}, {}, {}
    for weight_name, bias_name in model.dense_layers():
        weights[weight_name], scales[weight_name] = quantize_weight(
            model.params[weight_name], bits, per_channel=per_channel)
        xp = ns.namespace_of(model.params[bias_name])
        biases[bias_name] = xp.asarray(model.params[bias_name], copy=True)
    structure = copy.copy(model)
    structure.params = None
    return QuantizedModel(structure, weights, scales, biases, bits, per_channel,
                          activation_scales, activation_bits if activation_scales else None)


class QuantizationAware(Model):
    r"""Quantization-aware training of ``model``: fake-quantized weights, straight-through.

    A :class:`~optim_core.models.Model` to give :func:`~optim_core.fit` in place of
    ``model``: it shares ``model``'s parameters (float, trained as usual), but its loss
    and gradients are computed at the fake-quantized weights
    :math:`\tilde W = Q(W) s(W)` (:func:`quantize_weight`), and the gradient with respect
    to :math:`\tilde W` is used as the gradient of :math:`W` (the straight-through
    estimator of Bengio et al., 2013, as in Jacob et al., CVPR 2018). Biases are not
    quantized. Fine-tune a trained model a few epochs this way, then :func:`quantize`
    ``model``.

    Parameters
    ----------
    model : Model
    bits : int in [2, 8]
    per_channel : bool
    """

    def __init__(self, model: Model, bits: int = 8, *, per_channel: bool = True) -> None:
        if not isinstance(model, Model) or isinstance(model, QuantizationAware):
            raise TypeError("model must be a bundled optim_core model")
        # No Model.__init__: the parameters are the wrapped model's (see _params).
        self.model = model
        self.bits = _check_bits("bits", bits)
        self.per_channel = checks.boolean("per_channel", per_channel)
        self.task, self.metric_name = model.task, model.metric_name
        self._weights = tuple(weight for weight, _ in model.dense_layers())

    # The wrapped model's structure and parameters are this model's.
    @property
    def n_features(self) -> int:
        return self.model.n_features

    @property
    def _params(self) -> dict[str, Any] | None:
        return self.model._params

    @_params.setter
    def _params(self, params: dict[str, Any] | None) -> None:
        self.model._params = params

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return self.model.param_shapes()

    @property
    def regularized(self) -> tuple[str, ...]:
        return self.model.regularized

    def _initial_values(self, rng: Any) -> dict[str, Any]:
        return self.model._initial_values(rng)

    def _fake_quantized(self, xp: Any, params: Mapping[str, Any]) -> dict[str, Any]:
        out = dict(params)
        for name in self._weights:
            q, scale = quantize_weight(params[name], self.bits, per_channel=self.per_channel)
            out[name] = xp.astype(q, params[name].dtype) * scale
        return out

    def prepare_targets(self, xp: Any, y: Any, dtype: Any) -> Any:
        return self.model.prepare_targets(xp, y, dtype)

    def forward(self, xp: Any, params: Mapping[str, Any], X: Any) -> Any:
        return self.model.forward(xp, self._fake_quantized(xp, params), X)

    def predictions(self, xp: Any, outputs: Any) -> Any:
        return self.model.predictions(xp, outputs)

    def count_correct(self, xp: Any, outputs: Any, y: Any) -> Any:
        return self.model.count_correct(xp, outputs, y)

    def loss_terms(self, xp, params, X, y, *, key, need_grad=True):
        # Straight-through: the gradient at the fake-quantized weights is W's gradient.
        return self.model.loss_terms(xp, self._fake_quantized(xp, params), X, y, key=key,
                                     need_grad=need_grad)

    def dense_layers(self) -> tuple[tuple[str, str], ...]:
        return self.model.dense_layers()

    def forward_with(self, xp: Any, X: Any, dense: Any) -> Any:
        return self.model.forward_with(xp, X, dense)

    def probabilities(self, xp: Any, outputs: Any) -> Any:
        return self.model.probabilities(xp, outputs)

    def input_gradient(self, xp: Any, params: Mapping[str, Any], X: Any,
                       d_outputs: Any) -> Any:
        return self.model.input_gradient(xp, self._fake_quantized(xp, params), X, d_outputs)

    def _describe(self) -> str:
        return f"{self.model._describe()}, bits={self.bits}"
