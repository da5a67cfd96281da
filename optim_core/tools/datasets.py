"""Small real and synthetic data sets for the tools and the command line; nothing is downloaded.

* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 10
  classes), pixels scaled to [0, 1] by dividing by 16, split 75/25 stratified.
* ``"diabetes"``: scikit-learn's bundled diabetes regression set (442 patients,
  10 features), split 75/25; features and target standardized with the
  training split's mean and standard deviation (R^2 is unchanged by that scaling).
* ``"synthetic"``: a regression or classification problem of any size, drawn
  from a seed: standard normal features and a random linear teacher.

scikit-learn (the ``[train]`` extra) is imported only for the two real data sets,
and both ship inside its wheel, so loading them needs no network. The splits are
drawn here from the seed, not by scikit-learn's ``train_test_split``: its split is
another one, and the notebooks' measured conclusions were drawn on this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .. import _checks as checks
from ..train.extras import require

__all__ = ["Dataset", "load", "DATASETS", "TASKS"]

#: Names accepted by :func:`load`.
DATASETS = ("digits", "diabetes", "synthetic")
#: Tasks a synthetic data set can be drawn for.
TASKS = ("classification", "regression")


@dataclass(frozen=True)
class Dataset:
    """A train/test split of one data set, as NumPy arrays.

    Attributes
    ----------
    name : str
        The name :func:`load` was called with.
    task : {"classification", "regression"}
    X_train, y_train, X_test, y_test : numpy.ndarray
        Features of shape ``(n, n_features)``; labels are integer class indices
        (classification) or floats (regression).
    n_classes : int or None
        Number of classes; None for regression.
    """

    name: str
    task: str
    X_train: np.ndarray
    y_train: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray
    n_classes: int | None = None

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    def describe(self) -> str:
        """One line: name, task, sizes."""
        classes = f", {self.n_classes} classes" if self.n_classes else ""
        return (f"{self.name} ({self.task}{classes}): {self.X_train.shape[0]} train / "
                f"{self.X_test.shape[0]} test samples, {self.n_features} features")


def _stratified_split(y: np.ndarray, test_size: float, rng: np.random.Generator
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a split keeping each class's share (rounded) in both parts."""
    train, test = [], []
    for label in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == label))
        n_test = int(round(test_size * members.size))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _random_split(n: int, test_size: float, rng: np.random.Generator
                  ) -> tuple[np.ndarray, np.ndarray]:
    order = rng.permutation(n)
    n_test = int(round(test_size * n))
    return order[n_test:], order[:n_test]


def load(name: str, *, task: str = "classification", n_samples: int = 1000,
         n_features: int = 20, n_classes: int = 3, noise: float = 0.1,
         test_size: float = 0.25, seed: int = 0, dtype: Any = np.float64) -> Dataset:
    """Load a data set and split it into train and test parts.

    Parameters
    ----------
    name : {"digits", "diabetes", "synthetic"}
    task : {"classification", "regression"}, default "classification"
        Synthetic only (the real sets have their own task).
    n_samples, n_features, n_classes : int
        Synthetic only: size of the whole set (before the split), features, and
        classes (classification).
    noise : float, default 0.1
        Synthetic only: standard deviation of the noise added to the teacher's
        output (regression targets or class scores).
    test_size : float, default 0.25
        Share of the samples held out, in (0, 1).
    seed : int or None, default 0
        Seeds the split and the synthetic draw; the same seed gives the same arrays
        (None: fresh randomness).
    dtype : NumPy floating dtype, default float64
        dtype of the features (and of regression targets).

    Returns
    -------
    Dataset

    Raises
    ------
    ValueError
        For an unknown name or task, or a size, noise or test share out of range.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    test_size = checks.number("test_size", test_size, low=0.0, high=1.0, low_open=True,
                              high_open=True)
    if seed is not None:
        seed = checks.integer("seed", seed, minimum=0)
    dtype = np.dtype(dtype)
    if dtype.kind != "f":
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    rng = np.random.default_rng(seed)
    if name == "digits":
        X, y = require("sklearn.datasets", "the digits data set").load_digits(return_X_y=True)
        train, test = _stratified_split(y, test_size, rng)
        X = (X / 16.0).astype(dtype)
        return Dataset(name, "classification", X[train], y[train].astype(np.int64),
                       X[test], y[test].astype(np.int64), n_classes=10)
    if name == "diabetes":
        X, y = require("sklearn.datasets", "the diabetes data set").load_diabetes(
            return_X_y=True, scaled=False)
        train, test = _random_split(y.size, test_size, rng)
        # Statistics of the training part only, so nothing leaks from the test part.
        x_mean, x_std = X[train].mean(axis=0), X[train].std(axis=0)
        y_mean, y_std = y[train].mean(), y[train].std()
        X = ((X - x_mean) / x_std).astype(dtype)
        y = ((y - y_mean) / y_std).astype(dtype)
        return Dataset(name, "regression", X[train], y[train], X[test], y[test])
    return _synthetic(task, n_samples, n_features, n_classes, noise, test_size, rng, dtype)


def _synthetic(task: str, n_samples: int, n_features: int, n_classes: int, noise: float,
               test_size: float, rng: np.random.Generator, dtype: np.dtype) -> Dataset:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    n_samples = checks.integer("n_samples", n_samples, minimum=2)
    n_features = checks.integer("n_features", n_features, minimum=1)
    noise = checks.number("noise", noise, low=0.0)
    if task == "classification":
        n_classes = checks.integer("n_classes", n_classes, minimum=2)
    if not 1 <= int(round(test_size * n_samples)) < n_samples:
        raise ValueError(f"n_samples={n_samples} is too small to hold out test_size={test_size}")
    # Drawn directly in float32 when asked: a 60000 x 784 set then never exists in float64.
    X = rng.standard_normal((n_samples, n_features),
                            dtype=np.float32 if dtype == np.float32 else np.float64)
    if task == "regression":
        teacher = rng.standard_normal(n_features) / np.sqrt(n_features)
        y = X @ teacher + noise * rng.standard_normal(n_samples)
        train, test = _random_split(n_samples, test_size, rng)
        X, y = X.astype(dtype), y.astype(dtype)
        return Dataset("synthetic", "regression", X[train], y[train], X[test], y[test])
    teacher = rng.standard_normal((n_features, n_classes)) / np.sqrt(n_features)
    scores = X @ teacher + noise * rng.standard_normal((n_samples, n_classes))
    y = np.argmax(scores, axis=1).astype(np.int64)
    train, test = _random_split(n_samples, test_size, rng)
    X = X.astype(dtype)
    return Dataset("synthetic", "classification", X[train], y[train], X[test], y[test],
                   n_classes=n_classes)
