"""scikit-learn estimators over the bundled models: :class:`Classifier` and :class:`Regressor`.

They speak scikit-learn (``fit``, ``predict``, ``predict_proba``, ``score``,
``partial_fit``, ``get_params``/``set_params``, ``classes_``, ``n_features_in_``,
``feature_names_in_``), pass its estimator checks (``parametrize_with_checks``), and so
work with the tools users already know: ``Pipeline``, ``GridSearchCV``,
``cross_val_score``, ``permutation_importance``, ``shap``'s model-agnostic explainers.

They train through :func:`optim_core.fit`, so what ``fit`` takes they take (the model
and its sizes, the optimizer by name and its hyperparameters, learning rate, epochs,
batch size, schedule, penalties, clipping, early stopping, seed), and the data's array
library is kept: NumPy data (and lists, pandas frames...) is checked and converted as
scikit-learn does; CuPy, torch or JAX arrays train on their own device unconverted
(their predictions come back in that library); Dask arrays train on the cluster as
``fit`` trains them.

This module imports scikit-learn (the ``[train]`` extra); ``import optim_core`` does not.
"""

from __future__ import annotations

import math
from typing import Any

import array_api_compat
import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from .. import _namespace as ns
from ..optim import registry
from ..train import models
from ..train.callbacks import EarlyStopping
from ..train.fit import fit, make_optimizer

__all__ = ["Classifier", "Regressor"]


def _native(x: Any) -> bool:
    """Whether ``x`` is an array of a library other than NumPy (CuPy, torch, JAX, Dask...).

    Those are kept as they are; anything else goes through scikit-learn's ``check_array``.
    """
    return array_api_compat.is_array_api_obj(x) and not isinstance(x, np.ndarray)


class _Estimator(BaseEstimator):
    """What the classifier and the regressor share: parameters, training, pickling."""

    def __init__(self, model: str = "mlp", hidden_layer_sizes: tuple[int, ...] = (100,),
                 activation: str = "relu", dropout: float = 0.0, optimizer: str = "adam",
                 lr: float | None = None, epochs: int = 50, batch_size: int | None = 32,
                 schedule: Any = None, weight_decay: float | None = None, l1: float = 0.0,
                 l2: float = 0.0, clip_norm: float | None = None,
                 clip_value: float | None = None, early_stopping: bool = False,
                 validation_fraction: float = 0.1, patience: int = 10,
                 optimizer_params: dict[str, Any] | None = None, random_state: Any = None,
                 verbose: bool = False) -> None:
        self.model = model
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.dropout = dropout
        self.optimizer = optimizer
        self.lr = lr
        self.epochs = epochs
        self.batch_size = batch_size
        self.schedule = schedule
        self.weight_decay = weight_decay
        self.l1 = l1
        self.l2 = l2
        self.clip_norm = clip_norm
        self.clip_value = clip_value
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.patience = patience
        self.optimizer_params = optimizer_params
        self.random_state = random_state
        self.verbose = verbose

    # ------------------------------------------------------------------ input checks
    def _check_X(self, X: Any, *, reset: bool) -> Any:
        if _native(X):
            validate_data(self, X, skip_check_array=True, reset=reset)
            if X.ndim != 2:
                raise ValueError(f"Expected a 2D array, got an array of shape {tuple(X.shape)}")
            if X.shape[0] == 0:
                raise ValueError("Found array with 0 sample(s) while a minimum of 1 is required")
            return X
        return validate_data(self, X, reset=reset, dtype=(np.float64, np.float32))

    def _check_Xy(self, X: Any, y: Any, *, reset: bool) -> tuple[Any, Any]:
        if y is None:
            raise ValueError(f"{type(self).__name__} requires y to be passed, but the target y "
                             "is None")
        if _native(X) or _native(y):
            X = self._check_X(X, reset=reset)
            if not _native(y):
                raise TypeError("X and y must be arrays of one library")
            if y.shape[0] != X.shape[0]:
                raise ValueError(f"X has {X.shape[0]} samples but y has {y.shape[0]}")
            return X, y
        return validate_data(self, X, y, reset=reset, dtype=(np.float64, np.float32),
                             multi_output=self._multi_output, y_numeric=not self._classifier)

    _classifier = False
    _multi_output = False

    # ------------------------------------------------------------------ training
    def _seed(self) -> int:
        return int(check_random_state(self.random_state).randint(np.iinfo(np.int32).max))

    def _hidden(self) -> list[int]:
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, (int, np.integer)):
            sizes = (sizes,)
        return [int(s) for s in sizes]

    def _make(self, n_features: int, n_outputs: int) -> models.Model:
        raise NotImplementedError

    def _optimizer_kwargs(self) -> dict[str, Any]:
        params = self.optimizer_params
        if params is None:
            return {}
        if not isinstance(params, dict):
            raise TypeError(f"optimizer_params must be a dict or None, got {params!r:.80}")
        return dict(params)

    def _train(self, X: Any, y: Any, *, epochs: int, seed: int, fresh: bool,
               validation: tuple[Any, Any] | None = None, callbacks: list[Any] | None = None
               ) -> None:
        if fresh:
            optimizer: Any = self.optimizer
            kwargs, weight_decay = self._optimizer_kwargs(), self.weight_decay
        else:
            optimizer, kwargs, weight_decay = self._live_optimizer(), {}, None
        history = fit(self.model_, X, y, optimizer=optimizer, lr=self.lr, epochs=epochs,
                      batch_size=self.batch_size, schedule=self.schedule,
                      weight_decay=weight_decay, l1=self.l1, l2=self.l2,
                      clip_norm=self.clip_norm, clip_value=self.clip_value,
                      validation_data=validation, callbacks=callbacks or (), seed=seed,
                      progress=bool(self.verbose), **kwargs)
        self._optimizer = history.optimizer
        self._optimizer_state = None
        self.history_ = history.to_dicts()
        self.loss_curve_ = list(history.train_loss)
        self.n_iter_ = len(history)
        self.best_epoch_ = history.best_epoch

    def _live_optimizer(self) -> Any:
        """The optimizer that trained the model (rebuilt from its state after unpickling)."""
        if getattr(self, "_optimizer", None) is None:
            optimizer = make_optimizer(self.optimizer, self.model_.params, lr=self.lr,
                                       weight_decay=self.weight_decay,
                                       **self._optimizer_kwargs())
            optimizer.load_state_dict(self._optimizer_state)
            self._optimizer = optimizer
        return self._optimizer

    def _check_partial_decay(self) -> None:
        kind = registry.optimizer_class(self.optimizer).weight_decay_kind
        if self.weight_decay and kind not in ("decoupled", "switchable"):
            raise ValueError(f"partial_fit continues with the optimizer instance, and "
                             f"{self.optimizer!r} leaves decoupled weight decay to fit, which "
                             "applies it only to optimizers given by name: use an optimizer "
                             "with its own decoupled decay (adamw, lion, adam, nadam, radam) "
                             "or l2=")

    def _validation_split(self, X: Any, y: Any, seed: int) -> tuple[Any, Any, Any, Any]:
        if ns.is_dask_array(X):
            raise ValueError("early_stopping holds out validation_fraction of the data, which "
                             "is not done for Dask arrays; fit optim_core.fit with "
                             "validation_data instead")
        n = int(X.shape[0])
        n_val = int(math.ceil(self.validation_fraction * n))
        if not 0 < self.validation_fraction < 1 or n_val < 1 or n_val >= n:
            raise ValueError(f"validation_fraction={self.validation_fraction!r} must leave "
                             f"samples for both training and validation ({n} samples)")
        order = np.random.default_rng([seed, 3]).permutation(n)
        xp = ns.namespace_of(X)
        if isinstance(X, np.ndarray):
            val, train = order[:n_val], order[n_val:]
            return X[train], y[train], X[val], y[val]
        index = xp.asarray(order, dtype=xp.int64, device=ns.device_of(X))
        train, val = index[n_val:], index[:n_val]
        return (xp.take(X, train, axis=0), xp.take(y, train, axis=0),
                xp.take(X, val, axis=0), xp.take(y, val, axis=0))

    def _fit(self, X: Any, y: Any) -> Any:
        seed = self._seed()
        self._optimizer = None
        self._partial_calls = 0
        self._base_seed = seed
        if self.early_stopping:
            X_train, y_train, X_val, y_val = self._validation_split(X, y, seed)
            stopper = EarlyStopping("val_loss", patience=self.patience, restore_best=True)
            self._train(X_train, y_train, epochs=self.epochs, seed=seed, fresh=True,
                        validation=(X_val, y_val), callbacks=[stopper])
        else:
            self._train(X, y, epochs=self.epochs, seed=seed, fresh=True)
        return self

    def _partial(self, X: Any, y: Any, first: bool) -> Any:
        if first:
            self._base_seed = self._seed()
            self._partial_calls = 0
            self._optimizer = None
        else:
            self._check_partial_decay()
        seed = int(np.random.SeedSequence([self._base_seed, self._partial_calls])
                   .generate_state(1)[0])
        self._train(X, y, epochs=1, seed=seed, fresh=first)
        self._partial_calls += 1
        return self

    # ------------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        # The optimizer holds modules and kernels: it travels as its state_dict.
        state = dict(self.__dict__)
        optimizer = state.pop("_optimizer", None)
        if optimizer is not None:
            state["_optimizer_state"] = optimizer.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._optimizer = None

    def __sklearn_is_fitted__(self) -> bool:
        return hasattr(self, "model_")

    def _outputs_namespace(self, X: Any) -> Any:
        return ns.namespace_of(X) if _native(X) and not ns.is_dask_array(X) else None


class Classifier(ClassifierMixin, _Estimator):
    """A classifier trained by :func:`optim_core.fit`: softmax (or logistic) regression or an MLP.

    Parameters
    ----------
    model : {"mlp", "linear"}
        An :class:`~optim_core.models.MLP` with ``hidden_layer_sizes``, or logistic
        regression (2 classes) / softmax regression (more).
    hidden_layer_sizes : tuple of int
        Widths of the MLP's hidden layers (``()``: none).
    activation : {"relu", "tanh", "sigmoid"}
    dropout : float in [0, 1)
        The MLP's dropout rate.
    optimizer : str
        A name of :data:`optim_core.optim.registry.OPTIMIZERS` ("adam", "sgd"...).
    lr : float, optional
        Learning rate (None: the optimizer's default).
    epochs : int
        Passes over the data in ``fit``; ``partial_fit`` makes one.
    batch_size : int or None
        Samples per step (None: the whole set).
    schedule : callable ``(base_lr, step) -> lr``, optional
        From :mod:`optim_core.schedules`.
    weight_decay, l1, l2, clip_norm, clip_value
        As :func:`optim_core.fit` takes them.
    early_stopping : bool
        Hold out ``validation_fraction`` of the training data and stop when its loss
        has not improved for ``patience`` epochs, restoring the best epoch's weights.
    validation_fraction : float in (0, 1)
    patience : int
    optimizer_params : dict, optional
        Further hyperparameters of the optimizer (``{"momentum": 0.9}``...).
    random_state : int, RandomState or None
        Seeds fit (initial weights, batch order, dropout, the validation split).
    verbose : bool
        Show fit's progress bar.

    Attributes
    ----------
    classes_ : ndarray
        The class labels (sorted), as ``predict`` returns them.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Only when ``X`` had string column names (a pandas DataFrame).
    model_ : Model
        The trained :mod:`optim_core.models` model (labels ``0 .. n_classes - 1``).
    n_iter_ : int
        Epochs run by the last ``fit`` (or 1 by ``partial_fit``).
    loss_curve_ : list of float
        Training loss per epoch; ``history_`` has all of fit's epoch logs.
    """

    _classifier = True

    def _make(self, n_features: int, n_classes: int) -> models.Model:
        if self.model == "linear":
            return models.LogisticRegression(n_features) if n_classes == 2 else \
                models.SoftmaxRegression(n_features, n_classes)
        if self.model != "mlp":
            raise ValueError(f"model must be 'mlp' or 'linear', got {self.model!r}")
        return models.MLP([n_features, *self._hidden(), n_classes], self.activation,
                          self.dropout, task="classification")

    # ------------------------------------------------------------------ labels
    def _set_classes(self, y: Any, classes: Any = None) -> None:
        if classes is not None:
            labels = np.unique(np.asarray(classes))
        elif ns.is_dask_array(y):
            if not ns.namespace_of(y).isdtype(y.dtype, ("integral", "bool")):
                raise ValueError("Unknown label type: Dask labels must be integers")
            labels = np.unique(ns.to_numpy(np.unique(y).compute()))
        else:
            host = ns.to_numpy(y) if _native(y) else y
            check_classification_targets(host)
            labels = np.unique(host)
        if labels.shape[0] < 2:
            raise ValueError(f"{type(self).__name__} needs samples of at least 2 classes in the "
                             f"data, but the data contains only one class: {labels[0]!r}")
        self.classes_ = labels

    def _identity_labels(self) -> bool:
        classes = self.classes_
        return classes.dtype.kind in "iu" and np.array_equal(classes, np.arange(classes.size))

    def _encode(self, y: Any) -> Any:
        """Labels as ``0 .. n_classes - 1`` in ``y``'s library (ValueError for unknown ones)."""
        classes = self.classes_
        if not _native(y):
            check_classification_targets(y)
            encoded = np.searchsorted(classes, y)
            inside = encoded < classes.size
            if not (inside.all() and np.array_equal(classes[encoded], y)):
                unknown = np.setdiff1d(np.unique(y), classes)
                raise ValueError(f"y contains labels {unknown[:5]!r} not in classes_ {classes!r}")
            return encoded.astype(np.int64)
        xp = ns.namespace_of(y)
        if self._identity_labels():
            return xp.astype(y, xp.int64)
        if ns.is_dask_array(y):
            return y.map_blocks(_searchsorted_block, classes, dtype=np.int64)
        return xp.searchsorted(xp.asarray(classes, device=ns.device_of(y)), y)

    def _decode(self, labels: Any, like: Any) -> Any:
        if not _native(like):
            return self.classes_[ns.to_numpy(labels)]
        if self._identity_labels():
            return labels
        if ns.is_dask_array(labels):
            return labels.map_blocks(_take_block, self.classes_, dtype=self.classes_.dtype)
        xp = ns.namespace_of(labels)
        return xp.take(xp.asarray(self.classes_, device=ns.device_of(labels)), labels)

    # ------------------------------------------------------------------ API
    def fit(self, X: Any, y: Any) -> Classifier:
        """Train a new model on ``(X, y)`` for ``epochs`` epochs."""
        X, y = self._check_Xy(X, y, reset=True)
        self._set_classes(y)
        encoded = self._encode(y)
        self.model_ = self._make(int(X.shape[1]), int(self.classes_.size))
        return self._fit(X, encoded)

    def partial_fit(self, X: Any, y: Any, classes: Any = None) -> Classifier:
        """One epoch on ``(X, y)``, continuing the model and the optimizer's state.

        ``classes`` (every label there will be) is required on the first call.
        """
        first = not hasattr(self, "model_")
        X, y = self._check_Xy(X, y, reset=first)
        if first:
            if classes is None:
                raise ValueError("classes must be passed on the first call to partial_fit")
            self._set_classes(y, classes)
            self.model_ = self._make(int(X.shape[1]), int(self.classes_.size))
        elif classes is not None and not np.array_equal(np.unique(np.asarray(classes)),
                                                        self.classes_):
            raise ValueError(f"classes={classes!r} differs from the classes of the first "
                             f"partial_fit call, {self.classes_!r}")
        return self._partial(X, self._encode(y), first)

    def predict(self, X: Any) -> Any:
        """Class labels (from :attr:`classes_`)."""
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        return self._decode(self.model_.predict(X), X)

    def predict_proba(self, X: Any) -> Any:
        """Class probabilities, shape ``(n_samples, n_classes)``, columns as :attr:`classes_`."""
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        return self.model_.predict_proba(X)

    def predict_log_proba(self, X: Any) -> Any:
        """The log of :meth:`predict_proba`."""
        proba = self.predict_proba(X)
        xp = ns.namespace_of(proba)
        return xp.log(proba)

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """Mean accuracy on ``(X, y)`` (in the data's library for CuPy/torch/JAX arrays)."""
        if self._outputs_namespace(X) is None or sample_weight is not None:
            return super().score(X, y, sample_weight=sample_weight)
        xp = ns.namespace_of(X)
        predictions = self.predict(X)
        return float(xp.mean(xp.astype(predictions == y, xp.float64)))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_class = True
        tags.non_deterministic = False
        return tags


class Regressor(RegressorMixin, _Estimator):
    """A regressor trained by :func:`optim_core.fit`: linear least squares or an MLP.

    Parameters are :class:`Classifier`'s. ``model="linear"`` is
    :class:`~optim_core.models.LinearRegression` (a 1-D ``y``) or an MLP without hidden
    layers (a 2-D ``y``, one output per column); ``"mlp"`` an
    :class:`~optim_core.models.MLP` with the mean squared error.

    Attributes
    ----------
    n_features_in_, feature_names_in_, model_, n_iter_, loss_curve_
        As :class:`Classifier`'s.
    n_outputs_ : int
        Columns of ``y`` (1 for a 1-D ``y``).
    """

    _multi_output = True

    def _make(self, n_features: int, n_outputs: int) -> models.Model:
        if self.model == "linear":
            if n_outputs == 1:
                return models.LinearRegression(n_features)
            return models.MLP([n_features, n_outputs], task="regression")
        if self.model != "mlp":
            raise ValueError(f"model must be 'mlp' or 'linear', got {self.model!r}")
        return models.MLP([n_features, *self._hidden(), n_outputs], self.activation,
                          self.dropout, task="regression")

    def _targets(self, y: Any, *, reset: bool) -> Any:
        if y.ndim not in (1, 2):
            raise ValueError(f"y must be 1-D or 2-D, got shape {tuple(y.shape)}")
        y_2d = y.ndim == 2
        n_outputs = int(y.shape[1]) if y_2d else 1
        if reset:
            self._y_2d, self.n_outputs_ = y_2d, n_outputs
        elif (y_2d, n_outputs) != (self._y_2d, self.n_outputs_):
            raise ValueError(f"y has {n_outputs} outputs ({y.ndim}-D), the model "
                             f"{self.n_outputs_} ({2 if self._y_2d else 1}-D)")
        if y_2d and n_outputs == 1:
            # A single output is a vector to the models: train on the column, predict one.
            xp = ns.namespace_of(y)
            return xp.reshape(y, (-1,))
        return y

    def fit(self, X: Any, y: Any) -> Regressor:
        """Train a new model on ``(X, y)`` for ``epochs`` epochs."""
        X, y = self._check_Xy(X, y, reset=True)
        y = self._targets(y, reset=True)
        self.model_ = self._make(int(X.shape[1]), self.n_outputs_)
        return self._fit(X, y)

    def partial_fit(self, X: Any, y: Any) -> Regressor:
        """One epoch on ``(X, y)``, continuing the model and the optimizer's state."""
        first = not hasattr(self, "model_")
        X, y = self._check_Xy(X, y, reset=first)
        y = self._targets(y, reset=first)
        if first:
            self.model_ = self._make(int(X.shape[1]), self.n_outputs_)
        return self._partial(X, y, first)

    def predict(self, X: Any) -> Any:
        """Predictions: shape ``(n_samples,)``, or ``(n_samples, n_outputs)`` for a 2-D ``y``."""
        check_is_fitted(self)
        X = self._check_X(X, reset=False)
        out = self.model_.predict(X)
        if self._y_2d and out.ndim == 1:
            xp = ns.namespace_of(out)
            out = xp.reshape(out, (-1, 1))
        return out

    def score(self, X: Any, y: Any, sample_weight: Any = None) -> float:
        """:math:`R^2` on ``(X, y)`` (uniform average over outputs, as scikit-learn's)."""
        if self._outputs_namespace(X) is None or sample_weight is not None:
            return super().score(X, y, sample_weight=sample_weight)
        xp = ns.namespace_of(X)
        predictions = self.predict(X)
        y = xp.astype(y, predictions.dtype)
        residual = xp.sum((y - predictions) ** 2, axis=0)
        spread = xp.sum((y - xp.mean(y, axis=0)) ** 2, axis=0)
        return float(xp.mean(1.0 - residual / spread))

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        tags.non_deterministic = False
        return tags


def _searchsorted_block(block: Any, classes: np.ndarray) -> Any:
    xp = ns.namespace_of(block)
    return xp.searchsorted(xp.asarray(classes, device=ns.device_of(block)), block)


def _take_block(block: Any, classes: np.ndarray) -> Any:
    xp = ns.namespace_of(block)
    return xp.take(xp.asarray(classes, device=ns.device_of(block)), block)

