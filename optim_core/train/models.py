r"""Small models with analytic gradients, on any array API namespace.

Each model keeps its parameters in :attr:`Model.params`, a dict of name -> array
in one namespace and on one device, and computes its loss and exact gradients
with standard array API functions only, so the same code runs on NumPy, CuPy,
torch, array_api_strict and any compliant library. Parameters are created on the
training data's namespace, device and floating dtype (:meth:`Model.init_params`,
called by :func:`optim_core.fit` at the first fit), or assigned explicitly.

Losses (all averaged over the samples, computed stably):

* regression: mean squared error :math:`\frac1n\sum_i (f(x_i) - y_i)^2`;
* binary classification: cross-entropy on the logit :math:`z`,
  :math:`\frac1n\sum_i \log(1+e^{z_i}) - y_i z_i`, written as
  :math:`\max(z,0) + \log(1+e^{-|z|}) - yz` so it never overflows;
* multiclass: softmax cross-entropy
  :math:`\frac1n\sum_i \mathrm{logsumexp}(z_i) - z_{i,y_i}`, with the
  log-sum-exp shifted by the row maximum.

Labels of classifiers are integers ``0 .. n_classes - 1``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .. import _checks as checks
from .. import _namespace as ns
from . import data as data_adapters
from .regularization import dropout_key, dropout_mask

__all__ = ["Model", "LinearRegression", "LogisticRegression", "SoftmaxRegression", "MLP",
           "ACTIVATIONS"]

#: Hidden-layer activations of :class:`MLP`.
ACTIVATIONS = ("relu", "tanh", "sigmoid")


class Model:
    """Base class: parameters, validation, and the public loss/predict/score API.

    Subclasses define :meth:`param_shapes`, :meth:`_initial_values` (host
    arrays), :meth:`forward` (raw outputs: predictions or logits) and
    :meth:`loss_terms`.

    The methods :meth:`prepare`, :meth:`check_inputs`, :meth:`prepare_targets`,
    :meth:`forward`, :meth:`predictions`, :meth:`count_correct` and :meth:`loss_terms`
    are what training code (:func:`~optim_core.fit`, the data adapters of
    :mod:`optim_core.train.data`) computes with: pure functions of the parameters
    they are given, in the namespace ``xp`` they are given, checking nothing.

    Attributes
    ----------
    params : dict of str -> array, or None
        The parameters; None until :meth:`init_params` (or :func:`~optim_core.fit`)
        creates them, or until they are assigned.
    task : {"regression", "classification"}
    metric_name : {"r2", "accuracy"}
        What :meth:`score` returns.
    regularized : tuple of str
        Parameters that penalties and weight decay apply to (weights, not biases).
    """

    task: str
    metric_name: str

    def __init__(self) -> None:
        self._params: dict[str, Any] | None = None

    # ------------------------------------------------------------------ parameters
    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """The name and shape of every parameter, in order."""
        raise NotImplementedError

    @property
    def regularized(self) -> tuple[str, ...]:
        return tuple(name for name in self.param_shapes() if name.startswith("W"))

    @property
    def n_features(self) -> int:
        return self._n_features

    @property
    def params(self) -> dict[str, Any] | None:
        return self._params

    @params.setter
    def params(self, params: Mapping[str, Any] | None) -> None:
        if params is None:
            self._params = None
            return
        if not isinstance(params, Mapping):
            raise TypeError(f"params must be a dict of name -> array, got {type(params).__name__}")
        expected = self.param_shapes()
        if set(params) != set(expected):
            raise ValueError(f"params must have exactly the keys {list(expected)}, "
                             f"got {list(params)}")
        arrays = [params[name] for name in expected]
        xp = ns.common_namespace(arrays, list(expected))
        dtype = arrays[0].dtype
        for name, array in zip(expected, arrays, strict=True):
            if tuple(array.shape) != expected[name]:
                raise ValueError(f"parameter {name!r} has shape {tuple(array.shape)}, "
                                 f"expected {expected[name]}")
            if not ns.is_floating(xp, array):
                raise TypeError(f"parameter {name!r} has dtype {array.dtype}; "
                                "parameters must be floating point")
            if array.dtype != dtype:
                raise TypeError(f"parameter {name!r} has dtype {array.dtype}, the others "
                                f"{dtype}; all parameters must share one dtype")
        self._params = {name: params[name] for name in expected}

    def init_params(self, like: Any, seed: int | None = None, *, dtype: Any = None) -> dict:
        """Create the parameters on ``like``'s namespace and device.

        Parameters
        ----------
        like : array
            Typically the training inputs ``X``; the parameters take its namespace
            and device (for Dask data, its chunks'), and its dtype when it is
            floating point (else the namespace's default floating dtype).
        seed : int, optional
            Seed of the NumPy generator drawing the initial values (on the host,
            once, then moved to the device).
        dtype : dtype, optional
            Overrides the dtype.

        Returns
        -------
        dict
            The new :attr:`params`.
        """
        like = data_adapters.param_like(like)
        xp = ns.namespace_of(like)
        device = ns.device_of(like)
        if dtype is None:
            dtype = like.dtype if ns.is_floating(xp, like) else \
                xp.__array_namespace_info__().default_dtypes(device=device)["real floating"]
        values = self._initial_values(np.random.default_rng(seed))
        self.params = {name: xp.asarray(np.asarray(value, order="C"), dtype=dtype, device=device)
                       for name, value in values.items()}
        return self.params

    def _initial_values(self, rng: np.random.Generator) -> dict[str, np.ndarray]:
        return {name: np.zeros(shape) for name, shape in self.param_shapes().items()}

    # ------------------------------------------------------------------ public API
    def loss(self, X: Any, y: Any) -> float:
        """The loss on ``(X, y)`` (no dropout), as a Python float."""
        return self.prepare(X, y).loss(self, self._params)

    def loss_and_grad(self, X: Any, y: Any, training: bool = True,
                      rng: Any = None) -> tuple[float, dict[str, Any]]:
        """The loss and its exact gradient with respect to every parameter.

        Parameters
        ----------
        X, y : arrays
            A batch, in the parameters' namespace and on their device.
        training : bool
            Dropout is active only when True.
        rng : int or numpy.random.Generator, optional
            Source of the dropout masks: an integer key (masks are a pure function
            of it), or a generator from which one key is drawn. Without it, a
            model with dropout draws a fresh key from the operating system.

        Returns
        -------
        (float, dict)
            The loss, and the gradients keyed like :attr:`params` (same namespace,
            device and dtype).
        """
        data = self.prepare(X, y)
        key = _dropout_key(rng) if training else None
        loss, grads, _ = data.loss_and_grad(self, self._params, data.X, data.y, key=key)
        return float(loss), grads

    def predict(self, X: Any) -> Any:
        """Predictions: values for regression, integer labels for classification."""
        data = self.prepare(X)
        return self.predictions(data.xp, data.outputs(self, self._params))

    def score(self, X: Any, y: Any) -> float:
        """Accuracy for classifiers, :math:`R^2` for regression, as a Python float.

        :math:`R^2 = 1 - \\sum (y - \\hat y)^2 / \\sum (y - \\bar y)^2`, over all outputs
        together for a multi-output regression.
        """
        return self.prepare(X, y).score(self, self._params)

    def __repr__(self) -> str:
        state = "uninitialized" if self._params is None else \
            f"{ns.namespace_of(self._params[next(iter(self._params))]).__name__}"
        return f"{type(self).__name__}({self._describe()}, params={state})"

    # ------------------------------------------------------------------ for training code
    def prepare(self, X: Any, y: Any = None) -> Any:
        """``X`` (and ``y``) checked against the parameters, as a data adapter.

        The adapter (:mod:`optim_core.train.data`) holds ``X`` in the parameters'
        dtype and ``y`` as :meth:`prepare_targets` makes it.

        Raises
        ------
        RuntimeError
            Before the parameters exist.
        TypeError, ValueError
            For data of another library or device, or of the wrong shape.
        """
        if self._params is None:
            raise RuntimeError(f"{type(self).__name__} has no parameters yet: call "
                               "init_params(X) or optim_core.fit first")
        first = next(iter(self._params.values()))
        data = data_adapters.adapter(X, y)
        data.check_library(first)
        self.check_inputs(data.X, data.y)
        return data.in_dtype(self, first.dtype)

    def check_inputs(self, X: Any, y: Any = None, what: str = "") -> None:
        """ValueError unless ``X`` is ``(n_samples, n_features)`` and ``y`` has as many rows."""
        if X.ndim != 2:
            raise ValueError(f"X{what} must have shape (n_samples, {self.n_features}), "
                             f"got {tuple(X.shape)}")
        if X.shape[1] != self.n_features:
            raise ValueError(f"X{what} must have shape (n_samples, {self.n_features}): it has "
                             f"{X.shape[1]} features, the model expects {self.n_features}")
        if y is not None and y.shape[0] != X.shape[0]:
            raise ValueError(f"X{what} has {X.shape[0]} samples but y{what} has {y.shape[0]}")

    def prepare_targets(self, xp: Any, y: Any, dtype: Any) -> Any:
        """``y`` as the loss takes it: cast to ``dtype`` (regression) or integer labels."""
        if y.ndim != 1:
            raise ValueError(f"y must have shape (n_samples,), got {tuple(y.shape)}")
        return y if y.dtype == dtype else xp.astype(y, dtype)

    def forward(self, xp: Any, params: Mapping[str, Any], X: Any) -> Any:
        """The raw outputs on ``X``: predictions (regression) or logits, no dropout."""
        raise NotImplementedError

    def predictions(self, xp: Any, outputs: Any) -> Any:
        """Predictions from :meth:`forward`'s outputs (class labels for classifiers)."""
        return outputs

    def count_correct(self, xp: Any, outputs: Any, y: Any) -> Any:
        """The number of correct labels in ``outputs`` (classifiers), a 0-d array on the device."""
        return xp.sum(xp.astype(self.predictions(xp, outputs) == y, outputs.dtype))

    def loss_terms(self, xp: Any, params: Mapping[str, Any], X: Any, y: Any, *,
                   key: int | None, need_grad: bool = True) -> tuple[Any, Any, Any]:
        """``(loss, grads or None, outputs)`` of a batch, from one forward pass.

        The mean loss (a 0-d array), the exact gradients keyed like ``params`` (None
        without ``need_grad``) and the raw outputs (as :meth:`forward`'s). Dropout is
        active when ``key`` is given: its masks are a pure function of the key.
        """
        raise NotImplementedError

    # ------------------------------------------------------- layers (compression, explanations)
    def dense_layers(self) -> tuple[tuple[str, str], ...]:
        """The ``(weight, bias)`` parameter names of each affine layer, input to output.

        The weight of layer ``i`` maps its inputs (axis 0) to its outputs (axis 1, or a
        single output for a 1-D weight): :func:`optim_core.quantization.quantize` scales
        each output channel, :class:`optim_core.pruning.MagnitudePruning` prunes them.
        """
        return (("W", "b"),)

    def forward_with(self, xp: Any, X: Any, dense: Any) -> Any:
        r""":meth:`forward`, with layer ``i``'s affine map :math:`h \mapsto h W_i + b_i`
        computed by ``dense(i, h)``, everything else (activations, the output's shape) as
        :meth:`forward` does it. A quantized model's int8 layers run through this.
        """
        return dense(0, X)

    def probabilities(self, xp: Any, outputs: Any) -> Any:
        """Class probabilities ``(n_samples, n_classes)`` from :meth:`forward`'s outputs."""
        if self.task != "classification":
            raise AttributeError(f"{type(self).__name__} is a regression model: no probabilities")
        return xp.exp(_log_softmax(xp, outputs))

    def input_gradient(self, xp: Any, params: Mapping[str, Any], X: Any,
                       d_outputs: Any) -> Any:
        r"""The vector-Jacobian product :math:`\partial_X \sum_{ik} D_{ik} f(X)_{ik}`.

        ``f`` is :meth:`forward` (no dropout) and ``D = d_outputs`` has its outputs'
        shape, so one-hot rows give the gradient of one output per sample with respect
        to that sample's inputs (what saliency maps and integrated gradients take, see
        :mod:`optim_core.explain`). Exact and analytic, like the parameter gradients.

        Returns
        -------
        array
            Shape of ``X``.
        """
        weight = params[self.dense_layers()[0][0]]
        if weight.ndim == 1:
            return xp.reshape(d_outputs, (-1, 1)) * xp.reshape(weight, (1, -1))
        return d_outputs @ weight.T

    def _describe(self) -> str:
        return f"n_features={self.n_features}"


def _dropout_key(rng: Any) -> int:
    if rng is None:
        return int(np.random.SeedSequence().generate_state(1, np.uint64)[0])
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(0, 2**63))
    if isinstance(rng, (int, np.integer)) and not isinstance(rng, bool):
        return int(rng)
    raise TypeError(f"rng must be an int key or a numpy.random.Generator, got {type(rng).__name__}")


# ---------------------------------------------------------------------------- loss heads
def _mse(xp: Any, outputs: Any, y: Any, need_grad: bool) -> tuple[Any, Any]:
    residual = outputs - y
    loss = xp.mean(residual * residual)
    size = 1
    for extent in residual.shape:
        size *= extent
    return loss, (residual * (2.0 / size) if need_grad else None)


def _sigmoid(xp: Any, z: Any) -> Any:
    # exp(-|z|) never overflows; the two branches are the same function.
    e = xp.exp(-xp.abs(z))
    return xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def _binary_cross_entropy(xp: Any, z: Any, y: Any, need_grad: bool) -> tuple[Any, Any]:
    loss = xp.mean(xp.maximum(z, 0.0) - y * z + xp.log1p(xp.exp(-xp.abs(z))))
    return loss, ((_sigmoid(xp, z) - y) / z.shape[0] if need_grad else None)


def _log_softmax(xp: Any, Z: Any) -> Any:
    shifted = Z - xp.max(Z, axis=1, keepdims=True)
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))


def _one_hot(xp: Any, labels: Any, n_classes: int, dtype: Any) -> Any:
    classes = xp.arange(n_classes, dtype=labels.dtype, device=ns.device_of(labels))
    return xp.astype(xp.reshape(labels, (-1, 1)) == xp.reshape(classes, (1, -1)), dtype)


def _softmax_cross_entropy(xp: Any, Z: Any, labels: Any, need_grad: bool) -> tuple[Any, Any]:
    log_p = _log_softmax(xp, Z)
    onehot = _one_hot(xp, labels, Z.shape[1], Z.dtype)
    loss = -xp.sum(log_p * onehot) / Z.shape[0]
    return loss, ((xp.exp(log_p) - onehot) / Z.shape[0] if need_grad else None)


def _class_labels(xp: Any, y: Any, n_classes: int) -> Any:
    if y.ndim != 1:
        raise ValueError(f"y must be a vector of class labels, got shape {tuple(y.shape)}")
    if ns.is_floating(xp, y):
        y = xp.astype(y, xp.int64)
    elif not xp.isdtype(y.dtype, "integral"):
        raise TypeError(f"class labels must be integers 0..{n_classes - 1}, got dtype {y.dtype}")
    return y


# ---------------------------------------------------------------------------- models
class LinearRegression(Model):
    r"""Linear least squares :math:`f(x) = x^\top W + b`, trained on the mean squared error.

    Parameters ``W`` of shape ``(n_features,)`` and ``b`` of shape ``()``, both
    zero initially (the loss is convex).

    Parameters
    ----------
    n_features : int
    """

    task = "regression"
    metric_name = "r2"

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self._n_features = checks.integer("n_features", n_features, minimum=1)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.n_features,), "b": ()}

    def forward(self, xp: Any, params: Mapping[str, Any], X: Any) -> Any:
        return X @ params["W"] + params["b"]

    def loss_terms(self, xp, params, X, y, *, key, need_grad=True):
        outputs = self.forward(xp, params, X)
        loss, d_out = _mse(xp, outputs, y, need_grad)
        grads = {"W": d_out @ X, "b": xp.asarray(xp.sum(d_out))} if need_grad else None
        return loss, grads, outputs


class LogisticRegression(Model):
    r"""Binary logistic regression: :math:`P(y=1\mid x) = \sigma(x^\top W + b)`.

    Trained on the binary cross-entropy of the logit (stable form, see the module).
    ``W`` has shape ``(n_features,)``, ``b`` shape ``()``; both start at zero.
    :meth:`predict_proba` returns ``(n_samples, 2)`` probabilities of classes 0
    and 1, as scikit-learn does.

    Parameters
    ----------
    n_features : int
    """

    task = "classification"
    metric_name = "accuracy"
    n_classes = 2

    def __init__(self, n_features: int) -> None:
        super().__init__()
        self._n_features = checks.integer("n_features", n_features, minimum=1)

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        return {"W": (self.n_features,), "b": ()}

    def prepare_targets(self, xp, y, dtype):
        return _class_labels(xp, y, 2)

    def forward(self, xp, params, X):
        return X @ params["W"] + params["b"]

    def predictions(self, xp, outputs):
        return xp.astype(outputs > 0, xp.int64)

    def predict_proba(self, X: Any) -> Any:
        """Probabilities of classes 0 and 1, shape ``(n_samples, 2)``."""
        data = self.prepare(X)
        return self.probabilities(data.xp, data.outputs(self, self._params))

    def probabilities(self, xp: Any, outputs: Any) -> Any:
        p1 = _sigmoid(xp, outputs)
        return xp.stack([1.0 - p1, p1], axis=1)

    def loss_terms(self, xp, params, X, y, *, key, need_grad=True):
        z = self.forward(xp, params, X)
        loss, dz = _binary_cross_entropy(xp, z, xp.astype(y, z.dtype), need_grad)
        grads = {"W": dz @ X, "b": xp.asarray(xp.sum(dz))} if need_grad else None
        return loss, grads, z


class SoftmaxRegression(Model):
    r"""Multinomial logistic regression: :math:`P(y=k\mid x) = \mathrm{softmax}(x^\top W + b)_k`.

    Trained on the softmax cross-entropy (log-sum-exp form). ``W`` has shape
    ``(n_features, n_classes)``, ``b`` shape ``(n_classes,)``; both start at zero.

    Parameters
    ----------
    n_features : int
    n_classes : int
        At least 2; labels are ``0 .. n_classes - 1``.
    """

    task = "classification"
    metric_name = "accuracy"

    def __init__(self, n_features: int, n_classes: int) -> None:
        super().__init__()
        self._n_features = checks.integer("n_features", n_features, minimum=1)
        self.n_classes = checks.integer("n_classes", n_classes, minimum=2)

    def _describe(self) -> str:
        return f"n_features={self.n_features}, n_classes={self.n_classes}"

    def param_shapes(self):
        return {"W": (self.n_features, self.n_classes), "b": (self.n_classes,)}

    def prepare_targets(self, xp, y, dtype):
        return _class_labels(xp, y, self.n_classes)

    def forward(self, xp, params, X):
        return X @ params["W"] + params["b"]

    def predictions(self, xp, outputs):
        return xp.argmax(outputs, axis=1)

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, shape ``(n_samples, n_classes)``."""
        data = self.prepare(X)
        return data.xp.exp(_log_softmax(data.xp, data.outputs(self, self._params)))

    def loss_terms(self, xp, params, X, y, *, key, need_grad=True):
        Z = self.forward(xp, params, X)
        loss, dZ = _softmax_cross_entropy(xp, Z, y, need_grad)
        grads = {"W": X.T @ dZ, "b": xp.sum(dZ, axis=0)} if need_grad else None
        return loss, grads, Z


class MLP(Model):
    r"""A multilayer perceptron with dense layers and (inverted) dropout.

    Layer ``i`` computes :math:`h_{i+1} = \phi(h_i W_i + b_i)` with ``W{i}`` of
    shape ``(layer_sizes[i], layer_sizes[i+1])``; the last layer is linear and
    feeds the loss: softmax cross-entropy over ``layer_sizes[-1]`` classes for
    classification, mean squared error for regression (outputs of shape
    ``(n,)`` when ``layer_sizes[-1] == 1``, else ``(n, k)``).

    Weights are drawn once on the host: He normal (He et al., ICCV 2015) for
    ReLU, Glorot uniform (Glorot & Bengio, AISTATS 2010) for tanh and sigmoid;
    biases start at zero.

    Dropout (Srivastava et al., JMLR 2014) zeroes each hidden unit with
    probability ``dropout`` during training and scales the kept ones by
    :math:`1/(1-p)`, so nothing changes at prediction time. Masks are drawn on the
    device (:func:`optim_core.regularization.dropout_mask`).

    Parameters
    ----------
    layer_sizes : sequence of int
        Input size, hidden sizes, output size; e.g. ``(64, 128, 10)``.
    activation : {"relu", "tanh", "sigmoid"}
    dropout : float in [0, 1)
        Rate on every hidden layer's output.
    task : {"classification", "regression"}
    """

    def __init__(self, layer_sizes: Sequence[int], activation: str = "relu",
                 dropout: float = 0.0, *, task: str = "classification") -> None:
        super().__init__()
        if isinstance(layer_sizes, (str, bytes)) or not isinstance(layer_sizes, Sequence) \
                or len(layer_sizes) < 2:
            raise ValueError(f"layer_sizes must list at least an input and an output size, "
                             f"got {layer_sizes!r}")
        self.layer_sizes = tuple(checks.integer(f"layer_sizes[{i}]", s, minimum=1)
                                 for i, s in enumerate(layer_sizes))
        self.activation = checks.choice("activation", activation, ACTIVATIONS)
        self.dropout = checks.number("dropout", dropout, low=0.0, high=1.0, high_open=True)
        self.task = checks.choice("task", task, ("classification", "regression"))
        if task == "classification" and self.layer_sizes[-1] < 2:
            raise ValueError("a classification MLP needs at least 2 outputs (one per class)")
        self.metric_name = "accuracy" if task == "classification" else "r2"
        self._n_features = self.layer_sizes[0]
        # Names by layer, made once (the hot path formats no strings).
        self._layer_names = tuple((f"W{i}", f"b{i}") for i in range(self.n_layers))
        self._names = tuple(self.param_shapes())

    @property
    def n_classes(self) -> int:
        if self.task != "classification":
            raise AttributeError("a regression MLP has no classes")
        return self.layer_sizes[-1]

    @property
    def n_layers(self) -> int:
        return len(self.layer_sizes) - 1

    def _describe(self) -> str:
        return (f"layer_sizes={self.layer_sizes}, activation={self.activation!r}, "
                f"dropout={self.dropout}, task={self.task!r}")

    def param_shapes(self):
        shapes = {}
        sizes = self.layer_sizes
        for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            shapes[f"W{i}"] = (fan_in, fan_out)
            shapes[f"b{i}"] = (fan_out,)
        return shapes

    def _initial_values(self, rng):
        values = {}
        for name, shape in self.param_shapes().items():
            if name.startswith("b"):
                values[name] = np.zeros(shape)
            elif self.activation == "relu":
                values[name] = rng.normal(0.0, math.sqrt(2.0 / shape[0]), size=shape)
            else:
                limit = math.sqrt(6.0 / (shape[0] + shape[1]))
                values[name] = rng.uniform(-limit, limit, size=shape)
        return values

    def prepare_targets(self, xp, y, dtype):
        if self.task == "classification":
            return _class_labels(xp, y, self.n_classes)
        expected = 1 if self.layer_sizes[-1] == 1 else 2
        if y.ndim != expected or (expected == 2 and y.shape[1] != self.layer_sizes[-1]):
            want = "(n_samples,)" if expected == 1 else f"(n_samples, {self.layer_sizes[-1]})"
            raise ValueError(f"y must have shape {want}, got {tuple(y.shape)}")
        return y if y.dtype == dtype else xp.astype(y, dtype)

    def _activate(self, xp, z):
        if self.activation == "relu":
            return xp.maximum(z, 0.0)
        if self.activation == "tanh":
            return xp.tanh(z)
        return _sigmoid(xp, z)

    def _activation_grad(self, xp, z, a, upstream):
        if self.activation == "relu":
            # The derivative as a 0/1 mask times the upstream gradient (as a hand-written
            # loop does): the same numbers as a select, at a sixth of its cost in NumPy.
            return upstream * xp.astype(z > 0, upstream.dtype)
        if self.activation == "tanh":
            return upstream * (1.0 - a * a)
        return upstream * a * (1.0 - a)

    def _layers(self, xp, params, X, *, key):
        """Outputs, plus per hidden layer (pre-activation, activation, keep-mask, output)."""
        h, cache = X, []
        last = self.n_layers - 1
        for i, (weight, bias) in enumerate(self._layer_names):
            z = h @ params[weight] + params[bias]
            if i == last:
                return z, cache
            a = self._activate(xp, z)
            mask = None
            if key is not None and self.dropout > 0:
                mask = dropout_mask(xp, tuple(a.shape), self.dropout, dropout_key(key, i),
                                    device=ns.device_of(a))
                h = xp.where(mask, a * (1.0 / (1.0 - self.dropout)), 0.0)
            else:
                h = a
            cache.append((z, a, mask, h))
        raise AssertionError("unreachable")

    def _squeezed(self, out):
        return out[:, 0] if self.task == "regression" and self.layer_sizes[-1] == 1 else out

    def forward(self, xp, params, X):
        return self._squeezed(self._layers(xp, params, X, key=None)[0])

    def dense_layers(self) -> tuple[tuple[str, str], ...]:
        return self._layer_names

    def forward_with(self, xp, X, dense):
        h, last = X, self.n_layers - 1
        for i in range(self.n_layers):
            z = dense(i, h)
            if i == last:
                return self._squeezed(z)
            h = self._activate(xp, z)
        raise AssertionError("unreachable")

    def probabilities(self, xp, outputs):
        if self.task != "classification":
            raise AttributeError("a regression MLP has no probabilities")
        return xp.exp(_log_softmax(xp, outputs))

    def input_gradient(self, xp, params, X, d_outputs):
        out, cache = self._layers(xp, params, X, key=None)
        d_out = xp.reshape(d_outputs, out.shape)
        for i in reversed(range(self.n_layers)):
            d_h = d_out @ params[self._layer_names[i][0]].T
            if i == 0:
                return d_h
            z, a, _, _ = cache[i - 1]
            d_out = self._activation_grad(xp, z, a, d_h)
        raise AssertionError("unreachable")

    def predictions(self, xp, outputs):
        return xp.argmax(outputs, axis=1) if self.task == "classification" else outputs

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, shape ``(n_samples, n_classes)``."""
        if self.task != "classification":
            raise AttributeError("predict_proba is for classification MLPs")
        data = self.prepare(X)
        return data.xp.exp(_log_softmax(data.xp, data.outputs(self, self._params)))

    def loss_terms(self, xp, params, X, y, *, key, need_grad=True):
        out, cache = self._layers(xp, params, X, key=key)
        outputs = self._squeezed(out)
        if self.task == "classification":
            loss, d_out = _softmax_cross_entropy(xp, out, y, need_grad)
        else:
            loss, d_out = _mse(xp, outputs, y, need_grad)
            if need_grad and outputs is not out:
                d_out = xp.reshape(d_out, (-1, 1))
        grads = self._backward(xp, params, X, cache, d_out) if need_grad else None
        return loss, grads, outputs

    def _backward(self, xp, params, X, cache, d_out):
        """Gradients of every parameter from the output gradient ``d_out``."""
        grads = {}
        for i in reversed(range(self.n_layers)):
            weight, bias = self._layer_names[i]
            inputs = X if i == 0 else cache[i - 1][3]
            grads[weight] = inputs.T @ d_out
            grads[bias] = xp.sum(d_out, axis=0)
            if i > 0:
                z, a, mask, _ = cache[i - 1]
                d_h = d_out @ params[weight].T
                if mask is not None:
                    d_h = xp.where(mask, d_h * (1.0 / (1.0 - self.dropout)), 0.0)
                d_out = self._activation_grad(xp, z, a, d_h)
        return {name: grads[name] for name in self._names}
